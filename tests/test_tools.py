"""The tool environment: schemas from type hints, the hermes parser, tools in their own processes, the python
sandbox. Real processes throughout; no Ray, no models."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, Optional

import pytest

from rayrlhf.config import EnvConfig
from rayrlhf.envs import EnvFailure, EnvHost, HostSpec, check_env
from rayrlhf.envs.parsers import PARSERS, ToolCall, ToolCallError, parse_hermes
from rayrlhf.envs.sandbox import network_isolation, run_python
from rayrlhf.envs.schema import ToolSchemaError, check_arguments, function_schema, tool_schemas
from rayrlhf.envs.tools import PYTHON_TOOLS, ToolEnv
from rayrlhf.errors import InvalidInput

# ----- schemas ------------------------------------------------------------------------------------


def search(query: str, k: int = 3, lang: Literal["en", "fr"] = "en", tags: list[str] | None = None) -> list[str]:
    """Search the notes.

    Finds notes that match the query.

    Args:
        query: What to look for.
        k: How many results to return; the best
            come first.
        lang (str): The language.
        tags: Only notes with all these tags.

    Returns:
        The matching notes.
    """
    return []


def weigh(items: dict[str, float], scale: Optional[float], exact: bool = False) -> float:  # noqa: UP045 - Optional on purpose
    """Total weight."""
    return 0.0


def test_schema_from_hints_and_google_docstring() -> None:
    schema = function_schema(search)
    assert schema == {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the notes. Finds notes that match the query.",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "What to look for."},
                    "k": {"type": "integer", "description": "How many results to return; the best come first."},
                    "lang": {"type": "string", "enum": ["en", "fr"], "description": "The language."},
                    "tags": {"type": ["array", "null"], "items": {"type": "string"},
                             "description": "Only notes with all these tags."},
                },
                "required": ["query"],
            },
        },
    }
    params = function_schema(weigh)["function"]["parameters"]
    assert params["properties"] == {
        "items": {"type": "object", "additionalProperties": {"type": "number"}},
        "scale": {"type": ["number", "null"]},
        "exact": {"type": "boolean"},
    }
    assert params["required"] == ["items", "scale"]
    assert function_schema(weigh)["function"]["description"] == "Total weight."


def no_hint(x):  # noqa: ANN001, ANN201
    return x


def star(*args: int) -> int:
    return 0


def odd(x: tuple[int, int]) -> int:
    return 0


def union(x: int | str) -> int:
    return 0


@pytest.mark.parametrize(
    ("fn", "pattern"),
    [
        (no_hint, "parameter 'x': it has no type hint"),
        (star, "named arguments only"),
        (odd, "type tuple\\[int, int\\] is not supported"),
        (union, "only X \\| None unions"),
        (lambda x: x, "not a named function"),
    ],
)
def test_schema_errors_name_the_parameter(fn, pattern: str) -> None:
    with pytest.raises(ToolSchemaError, match=pattern):
        function_schema(fn)


def test_tool_names_are_unique_and_arguments_are_checked() -> None:
    with pytest.raises(ToolSchemaError, match="unique"):
        tool_schemas([search, search])
    schema = function_schema(search)
    assert check_arguments(schema, {"query": "x", "k": 2, "tags": None}) is None
    assert "missing required argument(s) ['query']" in check_arguments(schema, {"k": 2})
    assert "no parameter(s) ['q']" in check_arguments(schema, {"query": "x", "q": 1})
    assert "'k' must be integer" in check_arguments(schema, {"query": "x", "k": "2"})
    assert "'k' must be integer" in check_arguments(schema, {"query": "x", "k": True})
    assert "'lang' must be ['en', 'fr']" in check_arguments(schema, {"query": "x", "lang": "de"})
    assert "'tags' must be" in check_arguments(schema, {"query": "x", "tags": [1]})


# ----- hermes parser ------------------------------------------------------------------------------

def test_hermes_reads_calls() -> None:
    text = ('I will compute.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
            '<tool_call>{"name": "mul", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}</tool_call>')
    assert parse_hermes(text) == [ToolCall("add", {"a": 1, "b": 2}), ToolCall("mul", {"a": 3, "b": 4})]
    assert parse_hermes('<tool_call>{"name": "now"}</tool_call>') == [ToolCall("now", {})]
    assert parse_hermes("The answer is 42.") == []
    assert PARSERS["hermes"] is parse_hermes


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ('<tool_call>{"name": "add", "arguments": {"a": 1,}}</tool_call>', "tool call 1 is not valid JSON"),
        ('<tool_call>{"arguments": {}}</tool_call>', 'no "name" string'),
        ('<tool_call>["add"]</tool_call>', "must be a JSON object"),
        ('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>', '"arguments" must be a JSON object'),
        ('<tool_call>{"name": "add", "arguments": "{bad"}</tool_call>', '"arguments" is a string that is not valid JSON'),
        ('<tool_call>{"name": "add", "arguments": {}}', "not closed"),
    ],
)
def test_hermes_malformed_calls_raise(text: str, pattern: str) -> None:
    with pytest.raises(ToolCallError, match=pattern):
        parse_hermes(text)


# ----- the tool environment, in a real host process -----------------------------------------------

TOOLS = '''
import os, time


def add(a: float, b: float) -> float:
    """Add two numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def divide(a: float, b: float) -> float:
    """Divide a by b."""
    return a / b


def hang(seconds: float) -> str:
    """Sleep."""
    time.sleep(seconds)
    return "woke up"


def hog(mib: int) -> int:
    """Allocate memory."""
    return len(bytearray(mib << 20))


def crash() -> str:
    """Kill the tool process."""
    os._exit(7)


TOOLS = [add, divide, hang, hog, crash]
'''


def call(name: str, **arguments) -> str:
    return f'<tool_call>{json.dumps({"name": name, "arguments": arguments})}</tool_call>'


@pytest.fixture(scope="module")
def tools_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tools") / "calc.py"
    path.write_text(TOOLS)
    return path


@pytest.fixture(scope="module")
def tool_host(tools_file: Path) -> Iterator[EnvHost]:
    cfg = EnvConfig(tools=f"{tools_file}:TOOLS", step_timeout_s=10, tool_timeout_s=1.5, memory_limit_mb=1024)
    host = EnvHost(HostSpec.from_config(cfg), "tools")
    yield host
    host.shutdown()


def run_turn(host: EnvHost, episode: str, text: str):
    host.reset(episode, {"prompt": "q"}).result(timeout=30)
    try:
        return host.step(episode, text).result(timeout=30)
    finally:
        host.close(episode)


def test_tool_env_runs_calls_and_ends_on_an_answer(tool_host: EnvHost) -> None:
    tool_host.reset("e", {"prompt": "what is 2 + 3.5, then / 2?"}).result(timeout=30)
    turn = tool_host.step("e", "Let me add. " + call("add", a=2, b=3.5) + call("divide", a=5.5, b=2)).result(timeout=30)
    assert turn.messages == [{"role": "tool", "name": "add", "content": "5.5"},
                             {"role": "tool", "name": "divide", "content": "2.75"}]
    assert (turn.reward, turn.done) == (0.0, False)
    assert turn.info["tool_calls"] == 2 and turn.info["tool_errors"] == 0
    final = tool_host.step("e", "The answer is 2.75.").result(timeout=30)
    assert (final.messages, final.reward, final.done, final.info["tool_calls"]) == ([], 0.0, True, 0)
    tool_host.close("e")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (call("sub", a=1, b=2), "error: unknown tool 'sub'; available tools: add, divide, hang, hog, crash"),
        (call("add", a=1), "error: tool 'add' is missing required argument(s) ['b']"),
        (call("add", a=1, b="two"), "error: tool 'add': argument 'b' must be number, got 'two'"),
        (call("divide", a=1, b=0), "error: ZeroDivisionError: division by zero"),
        ('<tool_call>{"name": "add", "arguments": {"a": 1</tool_call>', "error: tool call 1 is not valid JSON"),
    ],
)
def test_bad_calls_become_error_messages(tool_host: EnvHost, text: str, expected: str) -> None:
    turn = run_turn(tool_host, f"bad-{abs(hash(text))}", text)
    assert turn.messages[0]["content"].startswith(expected), turn.messages
    assert (turn.done, turn.info["tool_calls"], turn.info["tool_errors"]) == (False, 1, 1)


def test_hung_hungry_and_crashing_tools_do_not_take_the_host_down(tool_host: EnvHost) -> None:
    started = time.monotonic()
    turn = run_turn(tool_host, "hang", call("hang", seconds=60))
    assert turn.messages[0]["content"] == "error: tool 'hang' timed out after 1.5s"
    assert time.monotonic() - started < 5
    hog = run_turn(tool_host, "hog", call("hog", mib=2048))  # over the 1024 MiB limit of the tool process
    assert hog.messages[0]["content"].startswith(("error: MemoryError", "error: the tool process died"))
    crash = run_turn(tool_host, "crash", call("crash"))
    assert crash.messages[0]["content"].startswith("error: the tool process died (exit code 7)")
    ok = run_turn(tool_host, "after", call("add", a=1, b=1) + call("hog", mib=10))
    assert [m["content"] for m in ok.messages] == ["2", str(10 << 20)]
    assert tool_host.stats()["crashes"] == 0


def test_check_env_validates_tools(tools_file: Path, tmp_path: Path) -> None:
    check_env(EnvConfig(tools=f"{tools_file}:TOOLS"), {"prompt": "q"})
    check_env(EnvConfig(class_="rayrlhf.envs.tools:ToolEnv", tools="rayrlhf.envs.tools:PYTHON_TOOLS"), {"prompt": "q"})
    bad = tmp_path / "bad_tools.py"
    bad.write_text("def f(x):\n    return x\nTOOLS = [f]\nNUMBER = 3\n")
    cases = [
        (EnvConfig(tools=f"{bad}:TOOLS"), r"env.tools .*parameter 'x': it has no type hint"),
        (EnvConfig(tools=f"{bad}:NUMBER"), r"env.tools .*expected a non-empty list of functions"),
        (EnvConfig(tools=f"{tools_file}:TOOLS", tool_parser="xml"), r"env.tool_parser 'xml': unknown"),
        (EnvConfig(tools=f"{tools_file}:TOOLS", kwargs={"parser": "x"}), r"env.kwargs: \['parser'\] are set from"),
        (EnvConfig(class_="collections:OrderedDict", tools=f"{tools_file}:TOOLS"), r"env.class .*no reset\(\)"),
        (EnvConfig(class_="rayrlhf.envs.tools:ToolEnv"), r"env.class .*is the tool environment: set env.tools"),
    ]
    for cfg, pattern in cases:
        with pytest.raises(InvalidInput, match=pattern):
            check_env(cfg, {"prompt": "q"})


def test_env_class_with_tools_must_be_the_tool_env(tools_file: Path, tmp_path: Path) -> None:
    other = tmp_path / "other_env.py"
    other.write_text("class E:\n    def reset(self, row): pass\n    def step(self, a): return None, 0.0, True\n")
    with pytest.raises(InvalidInput, match="only the built-in tool environment"):
        check_env(EnvConfig(class_=f"{other}:E", tools=f"{tools_file}:TOOLS"), {"prompt": "q"})
    sub = tmp_path / "sub_env.py"
    sub.write_text("from rayrlhf.envs.tools import ToolEnv\nclass Mine(ToolEnv):\n    pass\n")
    check_env(EnvConfig(class_=f"{sub}:Mine", tools=f"{tools_file}:TOOLS"), {"prompt": "q"})


def test_tool_env_in_process_schemas(tools_file: Path) -> None:
    env = ToolEnv(f"{tools_file}:TOOLS", tool_timeout_s=5)
    assert [s["function"]["name"] for s in env.tool_schemas] == ["add", "divide", "hang", "hog", "crash"]
    assert env.tool_schemas[0]["function"]["parameters"]["properties"]["a"] == {
        "type": "number", "description": "The first number."}
    assert env.reset({"prompt": "x"}) is None
    assert [s["function"]["name"] for s in tool_schemas(PYTHON_TOOLS)] == ["python"]


# ----- the python tool ----------------------------------------------------------------------------

def test_python_prints_and_reports_exceptions() -> None:
    assert run_python("print(6 * 7)\nimport sys; print('err', file=sys.stderr)") == "42\nerr\n"
    out = run_python("def f():\n    raise ValueError('nope')\nf()")
    assert "ValueError: nope" in out and 'File "main.py", line 2' in out and out.endswith("[exit status 1]")


def test_python_kills_infinite_loops_and_memory_bombs() -> None:
    started = time.monotonic()
    assert run_python("while True:\n    pass", timeout_s=1.0).endswith("[killed: timed out after 1s]")
    assert time.monotonic() - started < 4
    bomb = run_python("x = bytearray(4 << 30)\nprint('allocated')", memory_mb=256)
    assert "MemoryError" in bomb and "allocated" not in bomb
    spinner = run_python("import time\nt = time.time()\nwhile time.time() - t < 30:\n    pass", timeout_s=1.5)
    assert spinner.endswith(("[killed: timed out after 1.5s]", "[killed by SIGKILL: killed]"))  # CPU limit 2 s
    big = run_python("open('f', 'wb').write(b'x' * (32 << 20))")  # over the 16 MiB file size limit
    assert "File too large" in big or "SIGXFSZ" in big
    sleeper = run_python("import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; "
                         "time.sleep(60)'])\nimport time; time.sleep(60)", timeout_s=1.0)
    assert sleeper.endswith("[killed: timed out after 1s]")


def test_python_output_is_bounded_and_environment_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "secret-value-123")
    out = run_python("import os\nprint(sorted(os.environ))\nprint(os.environ.get('HF_TOKEN'))\nprint(os.getcwd())")
    assert "HF_TOKEN" not in out and "secret-value-123" not in out and "None" in out
    assert "rayrlhf-python-" in out  # runs in its own temporary directory
    long = run_python("print('x' * 100000)", max_output_chars=1000)
    assert long.startswith("x" * 1000) and "[output truncated: 100001 bytes in all]" in long
    assert run_python("import sys; print(sys.stdin.read() == '')") == "True\n"


def test_python_has_no_network_where_unshare_works_and_says_so_where_it_does_not(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    interfaces = "import socket\nprint([name for _, name in socket.if_nameindex()])"
    if network_isolation():  # this machine (and CI) permits it: only the loopback is in sight
        assert run_python(interfaces).strip() == "['lo']"
        if "--mount-proc" in network_isolation():  # its own PID namespace: no other process in sight
            assert run_python("import os\nprint([p for p in os.listdir('/proc') if p.isdigit()])").strip() == "['1']"
    # where `unshare` is missing or refused, the code still runs, and the log says the network is not isolated
    import rayrlhf.envs.sandbox as sandbox

    network_isolation.cache_clear()
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    try:
        with caplog.at_level("INFO", logger=sandbox.log.name):
            assert network_isolation() == []
        assert "sandboxed code keeps the host's network" in caplog.text
        assert run_python("print(6 * 7)") == "42\n"
    finally:
        network_isolation.cache_clear()


def test_python_tool_through_the_tool_env() -> None:
    cfg = EnvConfig(tools="rayrlhf.envs.tools:PYTHON_TOOLS", step_timeout_s=20)
    host = EnvHost(HostSpec.from_config(cfg), "py")
    try:
        turn = run_turn(host, "py", call("python", code="print(sum(range(10)))"))
        assert turn.messages == [{"role": "tool", "name": "python", "content": "45\n"}]
    finally:
        host.shutdown()


def test_failures_do_not_leak_between_module_and_envfailure_types() -> None:
    # a guard that the public names stay importable where docs/agents.md says
    from rayrlhf.envs.tools import python

    assert python.__name__ == "python" and issubclass(EnvFailure, Exception)
    assert os.environ.get("HF_TOKEN") is None

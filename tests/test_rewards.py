"""Reward sources: user functions (with failures isolated per sample), HTTP endpoints, the reward actor."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rayrlhf.errors import InvalidInput
from rayrlhf.rewards.functions import (
    FunctionRunner,
    check_reward_function,
    load_reward_function,
    score_with_function,
)
from rayrlhf.rewards.remote import score_with_http
from rayrlhf.rewards.tasks import sort_reward, sort_score

FLAKY = '''
def reward(prompts, responses, answer, **_):
    out = []
    for r, a in zip(responses, answer):
        if r == "boom":
            raise RuntimeError("cannot score this one")
        out.append(None if r == "skip" else float(r == a))
    return out
'''


@pytest.fixture
def flaky_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_reward.py"
    path.write_text(FLAKY)
    return path


def test_sort_task_reward() -> None:
    assert sort_score("abc", "abc") == 1.0
    assert sort_score(" abc\n", "abc") == 1.0
    assert sort_score("abx", "abc") == pytest.approx(0.5 * 2 / 3)
    assert sort_score("", "abc") < 0 < sort_score("a", "abc") < sort_score("ab", "abc")
    assert sort_reward(["sort: cba", "sort: ba"], ["abc", "ba"], answer=["abc", "ab"]) == [1.0, 0.0]


def test_load_from_file_and_module(flaky_file: Path) -> None:
    fn = load_reward_function(f"{flaky_file}:reward")
    assert fn(["p"], ["x"], answer=["x"]) == [1.0]
    assert load_reward_function("rayrlhf.rewards.tasks:sort_reward") is sort_reward


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("no_colon", "expected 'path/to/file.py:fn'"),
        ("missing.py:fn", "does not exist"),
        ("rayrlhf.rewards.tasks:nope", "has no function 'nope'"),
        ("not_a_module_xyz:fn", "cannot import module"),
    ],
)
def test_bad_specs_name_the_problem(spec: str, pattern: str) -> None:
    with pytest.raises(InvalidInput, match=pattern):
        load_reward_function(spec)


HANGS = '''
import time

def reward(prompts, responses, **_):
    if "hang" in responses:
        time.sleep(3600)
    return [float(len(r)) for r in responses]
'''


def direct(fn):
    """A reward function called in this process, with FunctionRunner's calling convention."""
    return lambda prompts, responses, columns: fn(prompts, responses, **columns)


def test_failures_are_isolated_per_sample(flaky_file: Path) -> None:
    runner = FunctionRunner(f"{flaky_file}:reward", timeout_s=10)
    responses = ["a", "boom", "c", "skip", "nan"]
    scores = score_with_function(runner, ["p"] * 5, responses, {"answer": ["a", "b", "x", "d", "nan"]})
    assert scores == [1.0, None, 0.0, None, 1.0]
    runner.close()


def test_non_finite_and_non_numeric_scores_become_none() -> None:
    def fn(prompts, responses, **_):
        return [float("nan"), "oops", 2, float("inf")]

    assert score_with_function(direct(fn), ["p"] * 4, ["r"] * 4, {}) == [None, None, 2.0, None]


def test_a_hanging_function_is_stopped_at_its_timeout_without_leaking_a_thread(tmp_path: Path) -> None:
    """The batch that hangs costs one timeout (not one per sample), the process is replaced, nothing is left running."""
    path = tmp_path / "hangs.py"
    path.write_text(HANGS)
    runner = FunctionRunner(f"{path}:reward", timeout_s=1.0)
    threads = threading.active_count()
    start = time.monotonic()
    assert score_with_function(runner, ["p"] * 4, ["a", "hang", "bc", "d"], {}, timeout_s=1.0) == [None] * 4
    assert time.monotonic() - start < 1.0 + 20  # one timeout plus a restart, not 4 x the timeout
    assert runner.restarts == 1 and threading.active_count() == threads
    assert score_with_function(runner, ["p", "p"], ["ab", "c"], {}, timeout_s=1.0) == [2.0, 1.0]  # the new process works
    runner.close()


def test_reward_function_signature_is_checked_against_the_data_columns(flaky_file: Path) -> None:
    assert check_reward_function(f"{flaky_file}:reward", ["answer"])
    with pytest.raises(InvalidInput, match=r"needs the column\(s\) \['answer'\], which data.train does not have"):
        check_reward_function(f"{flaky_file}:reward", ["solution"])
    with pytest.raises(InvalidInput, match="would arrive as keyword arguments"):
        check_reward_function("rayrlhf.rewards.tasks:sort_score", ["answer"])  # (response, answer): positional
    (Path(flaky_file).parent / "strict.py").write_text("def reward(prompts, responses, answer):\n    return [0.0]\n")
    with pytest.raises(InvalidInput, match=r"\['level'\] are passed as keyword arguments, which it does not accept"):
        check_reward_function(f"{Path(flaky_file).parent / 'strict.py'}:reward", ["answer", "level"])


@pytest.fixture
def reward_endpoint() -> Iterator[tuple[str, dict]]:
    """A local HTTP reward server that fails its first request (to exercise retries)."""
    state = {"calls": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server API
            state["calls"] += 1
            state["auth"] = self.headers.get("Authorization")
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if state["calls"] == 1:
                self.send_response(503)
                self.end_headers()
                return
            rewards = [float(len(r)) for r in body["responses"]]
            payload = json.dumps({"rewards": rewards}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/score", state
    finally:
        server.shutdown()


def test_http_reward_retries_then_succeeds(reward_endpoint: tuple[str, dict]) -> None:
    url, state = reward_endpoint
    assert score_with_http(url, ["p", "q"], ["ab", "abcd"], {}, timeout_s=2, max_retries=2, backoff_s=0.01,
                           token="s3cret") == [2.0, 4.0]
    assert state["calls"] == 2 and state["auth"] == "Bearer s3cret"  # the token travels as a header, not in the URL


def test_http_reward_gives_up_after_bounded_retries() -> None:
    start = time.monotonic()
    scores = score_with_http("http://127.0.0.1:9/none", ["p"], ["r"], {}, timeout_s=0.5, max_retries=2, backoff_s=0.01)
    assert scores == [None]
    assert time.monotonic() - start < 5


def test_reward_actor_counts_failures_without_crashing(ray_local: None, flaky_file: Path) -> None:
    import ray

    from rayrlhf.actors.reward_server import RemoteRewardServer

    server = RemoteRewardServer.options(num_cpus=0).remote(function=f"{flaky_file}:reward")
    scores = ray.get(server.score.remote(["p"] * 4, ["a", "boom", "b", "boom"], {"answer": ["a", "a", "b", "b"]}))
    assert scores == [1.0, None, 1.0, None]
    assert sum(s is None for s in scores) == 2
    # The actor is still alive and scoring after the failures.
    assert ray.get(server.score.remote(["p"], ["z"], {"answer": ["z"]})) == [1.0]
    ray.kill(server)


def test_reward_model_server_scores_token_batches(ray_local: None, tiny_model: Path, tmp_path: Path) -> None:
    import ray
    import torch

    from rayrlhf.actors.reward_server import RemoteRewardServer
    from rayrlhf.models.forward import pack_batch, sequence_scores
    from rayrlhf.models.loading import load_reward_model, load_tokenizer

    rm_dir = tmp_path / "rm"  # a saved reward model, so the server and this test share its head
    load_reward_model(tiny_model, dtype="float32").save_pretrained(rm_dir)
    load_tokenizer(tiny_model).save_pretrained(rm_dir)
    batch = pack_batch([[5, 6, 7], [8, 9]], [[10, 11], [12]], pad_id=0)
    server = RemoteRewardServer.options(num_cpus=0).remote(model_path=str(rm_dir), dtype="float32")
    scores = ray.get(server.score.remote(["", ""], ["", ""], batch=batch))
    with torch.no_grad():
        expected = sequence_scores(load_reward_model(rm_dir, dtype="float32").eval(), batch)
    assert scores == pytest.approx(expected.tolist(), abs=1e-5)
    ray.kill(server)


def test_reward_model_scores_that_are_not_finite_count_as_unscored(tiny_model: Path, tmp_path: Path) -> None:
    import torch

    from rayrlhf.actors.reward_server import RewardServer
    from rayrlhf.models.forward import pack_batch
    from rayrlhf.models.loading import load_reward_model, load_tokenizer

    rm = load_reward_model(tiny_model, dtype="float32")
    with torch.no_grad():
        rm.score.weight.fill_(float("nan"))
    rm.save_pretrained(tmp_path / "rm")
    load_tokenizer(tiny_model).save_pretrained(tmp_path / "rm")
    server = RewardServer(model_path=str(tmp_path / "rm"), dtype="float32")
    batch = pack_batch([[5, 6, 7], [8, 9]], [[10, 11], [12]], pad_id=0)
    assert server.score(["", ""], ["", ""], batch=batch) == [None, None]  # not 0 or 3.4e38 later on


def test_a_reward_model_with_another_tokenizer_scores_its_own_tokens(tiny_model: Path, tmp_path: Path) -> None:
    """The policy's token ids mean nothing to it: it re-tokenizes the decoded prompt and response itself."""
    import torch

    from rayrlhf.actors.reward_server import RewardServer
    from rayrlhf.models.forward import pack_batch, sequence_scores
    from rayrlhf.models.loading import load_reward_model
    from rayrlhf.models.tiny import build_tokenizer

    other = build_tokenizer(charset="zyxwvutsrqponmlkjihgfedcba :\n")  # other ids for the same text
    other.chat_template = None
    rm = load_reward_model(tiny_model, dtype="float32")
    rm.save_pretrained(tmp_path / "rm")
    other.save_pretrained(tmp_path / "rm")
    server = RewardServer(model_path=str(tmp_path / "rm"), dtype="float32", policy_tokenizer=str(tiny_model))
    policy_ids = pack_batch([[5, 6]], [[7, 8]], pad_id=0)  # what the policy would have sent
    scores = server.score(["sort: cba"], ["abc"], batch=policy_ids)
    own = other("sort: cbaabc")["input_ids"] + [other.eos_token_id]
    with torch.no_grad():
        expected = sequence_scores(load_reward_model(tmp_path / "rm", dtype="float32").eval(), pack_batch([[]], [own], 0))
    assert scores == pytest.approx(expected.tolist(), abs=1e-5)
    same = RewardServer(model_path=str(tiny_model), dtype="float32", policy_tokenizer=str(tiny_model))
    assert same.tokenizer is None  # same tokenizer: the policy's tokens are scored as they are


# ----------------------------------------------------------------------------- weighted functions


def test_weighted_sum_is_unscored_when_a_weighted_part_is_missing() -> None:
    from rayrlhf.rewards.combine import weighted_sum

    parts = {"a": [1.0, None, 2.0, 1.0], "b": [0.5, 1.0, None, 0.0], "log": [None, 3.0, 4.0, 9.0]}
    weights = {"a": 1.0, "b": -2.0, "log": 0.0}
    assert weighted_sum(parts, weights) == [0.0, None, None, 1.0]  # a weight-0 part is only logged
    with pytest.raises(ValueError, match="different numbers of scores"):
        weighted_sum({"a": [1.0], "b": [1.0, 2.0]}, {"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="name different functions"):
        weighted_sum({"a": [1.0]}, {"b": 1.0})


def test_reward_server_scores_weighted_functions_each_in_its_own_process(flaky_file: Path) -> None:
    from rayrlhf.actors.reward_server import RewardServer

    server = RewardServer(functions=[
        {"function": "rayrlhf.rewards.tasks:sort_reward", "weight": 2.0, "name": "sort"},
        {"function": f"{flaky_file}:reward", "weight": 0.5, "name": "exact"},
    ], timeout_s=20)
    try:
        pids = {runner._proc.pid for _, runner in server.parts.values()}
        assert len(pids) == 2
        responses, answer = ["abc", "boom", "abx", "skip"], ["abc", "abc", "abc", "abc"]
        combined, parts = server.score_parts(["p"] * 4, responses, {"answer": answer})
        sort = [sort_score(r, a) for r, a in zip(responses, answer)]
        assert parts == {"sort": pytest.approx(sort), "exact": [1.0, None, 0.0, None]}
        assert combined == pytest.approx([2.0 * sort[0] + 0.5, None, 2.0 * sort[2], None])
        assert server.score(["p"], ["abc"], {"answer": ["abc"]}) == [2.5]  # score: the combined list, as before
    finally:
        for _, runner in server.parts.values():
            runner.close()
    single = RewardServer(function="rayrlhf.rewards.tasks:sort_reward")
    try:
        assert single.score_parts(["p"], ["abc"], {"answer": ["abc"]}) == ([1.0], {})  # one function: no parts
    finally:
        single.fn.close()
    with pytest.raises(InvalidInput, match="has no function 'nope'"):
        RewardServer(functions=[{"function": "rayrlhf.rewards.tasks:sort_reward"},
                                {"function": "rayrlhf.rewards.tasks:nope"}])


def test_errors_name_the_key_of_the_function() -> None:
    with pytest.raises(InvalidInput, match=r"reward\.functions\[1\]\.function 'rayrlhf\.rewards\.tasks:nope'"):
        check_reward_function("rayrlhf.rewards.tasks:nope", ["answer"], key="reward.functions[1].function")


# ----------------------------------------------------------------------------- verifiable math reward

MATH_CASES = [  # (response, gold answer, expected score)
    ("so x = 1/2, i.e. \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{2}{4}}", "$\\frac12$", 1.0),
    ("The roots are \\boxed{\\{3, -1\\}}.", "\\{-1, 3\\}", 1.0),
    ("\\boxed{\\{3, 1\\}}", "\\{-1, 3\\}", 0.0),
    ("\\boxed{(x+1)^2}", "x^2 + 2x + 1", 1.0),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),
    ("\\boxed{[1, 3]}", "[1, 3)", 0.0),
    ("first \\boxed{7}, then corrected: \\boxed{8}", "8", 1.0),  # the last box is the answer
    ("\\boxed{7}", "8", 0.0),
    ("\\boxed{}", "8", 0.0),
    ("After simplifying, the answer is $\\frac{3}{4}$.", "0.75", 1.0),  # fallback 2: the answer marker
    ("Answer: 42", "42", 1.0),
    ("we count 12 apples and 1,000 pears", "1000", 1.0),  # fallback 3: the last number
    ("we count 12 apples and 1,000 pears", "12", 0.0),
    ("I do not know.", "5", 0.0),
    ("\\boxed{5}", "", None),  # a gold answer that does not parse: unscored
    ("\\boxed{5}", "\\frac{", None),
    ("\\boxed{" + "1+" * 800 + "1}", "1601", 0.0),  # longer than MAX_ANSWER_CHARS: not read
]


def test_math_accuracy_compares_final_answers_symbolically() -> None:
    from rayrlhf.rewards.math import accuracy

    responses = [r for r, _, _ in MATH_CASES]
    golds = [g for _, g, _ in MATH_CASES]
    assert accuracy([""] * len(MATH_CASES), responses, answer=golds, level=[1] * len(MATH_CASES)) == [
        e for _, _, e in MATH_CASES
    ]


def test_math_answer_extraction_and_format_reward() -> None:
    from rayrlhf.rewards.math import count_boxed, extract_answer, format

    assert extract_answer("x \\boxed{\\{1, 2\\}} y") == ("\\{1, 2\\}", "boxed")  # escaped braces are text
    assert extract_answer("\\fbox{\\frac{1}{2}}") == ("\\frac{1}{2}", "boxed")
    assert extract_answer("\\boxed{3 and an unclosed \\boxed{4}") == ("4", "boxed")
    assert extract_answer("The final answer is: 2x.\nThanks") == ("2x.", "marker")
    assert extract_answer("no digits") is None
    assert count_boxed("\\boxed{1} \\boxed{} \\boxed{\\frac{1}{2}}") == 2
    responses = ["\\boxed{1}", "\\boxed{1} or \\boxed{2}", "1", "\\boxed{}", "\\boxed{\\boxed{1}}"]
    assert format(["p"] * 5, responses) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert check_reward_function("rayrlhf.rewards.math:accuracy", ["answer", "level"])
    assert check_reward_function("rayrlhf.rewards.math:format", ["answer"])
    with pytest.raises(InvalidInput, match=r"needs the column\(s\) \['answer'\]"):
        check_reward_function("rayrlhf.rewards.math:accuracy", ["solution"])


def test_math_reward_bounds_the_time_of_each_sample() -> None:
    """A tower of powers keeps sympy busy for minutes: it scores 0.0 after the per-sample bound, and the
    next sample is scored normally (the timer and the signal handler are restored)."""
    import signal

    from rayrlhf.rewards import math as math_reward

    handler = signal.getsignal(signal.SIGALRM)
    start = time.monotonic()
    out = math_reward.accuracy(["p", "p"], ["\\boxed{2^{2^{2^{2^{2^{100}}}}}}", "\\boxed{5}"], answer=["5", "5"])
    assert out == [0.0, 1.0]
    assert time.monotonic() - start < math_reward.ANSWER_TIMEOUT_S + 5
    assert signal.getsignal(signal.SIGALRM) is handler and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    slow_gold = math_reward.score_answer("\\boxed{1}", "5", gold_timeout_s=1e-6)  # no time to parse the gold
    assert slow_gold is None


def test_math_reward_outside_the_main_thread_runs_without_a_signal() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from rayrlhf.rewards.math import accuracy

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(accuracy, ["p"], ["\\boxed{\\frac{2}{4}}"], ["0.5"]).result() == [1.0]


def test_math_reward_in_its_reward_process() -> None:
    """The production path: the built-in function loaded by name in a FunctionRunner child."""
    runner = FunctionRunner("rayrlhf.rewards.math:accuracy", timeout_s=60)
    try:
        scores = score_with_function(runner, ["p"] * 3, ["\\boxed{\\frac{1}{3}}", "\\boxed{0.3}", "\\boxed{1}"],
                                     {"answer": ["1/3", "1/3", None]})
        assert scores == [1.0, 0.0, None]
    finally:
        runner.close()


ROOT = Path(__file__).resolve().parents[1]


def test_a_reward_server_for_functions_does_not_load_torch() -> None:
    """The reward server's process starts beside the trainer and rollout processes; one serving only functions must
    not spend start-up importing torch and transformers (about 4 s of CPU on the 2-core machine). A model-serving
    server imports them when it loads its model."""
    code = ("import sys, rayrlhf.actors.reward_server as m\n"
            "m.RewardServer(function='rayrlhf.rewards.tasks:alphabet_reward').fn.close()\n"
            "print(sorted(n for n in ('torch', 'transformers') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout

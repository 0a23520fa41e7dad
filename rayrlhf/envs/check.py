"""`check_env`: is the configured environment usable? Run before Ray starts, so that a mistake exits 2
with a message naming env.class, env.kwargs, env.tools or env.tool_parser."""

from __future__ import annotations

import inspect
from typing import Any

from rayrlhf.envs.host import START_TIMEOUT_S, EnvHost
from rayrlhf.envs.protocol import TOOL_ENV_KEYS, EnvFailure, HostSpec
from rayrlhf.errors import InvalidInput
from rayrlhf.user_code import load_object

CHECK_EPISODE = "env-check"


def check_env(env: Any, sample_row: dict) -> None:
    """Check an EnvConfig: the class imports and has callable reset/step (and close, if any), env.kwargs fit its
    constructor, the tools give schemas; then, in a host process as in a run, the class is built with env.kwargs
    and reset(sample_row) (a row of data.train) must return messages in time. Does nothing for single-turn jobs."""
    if not env.enabled:
        return
    key = "env.class" if env.class_ else "env.tools"
    spec = env.class_spec
    cls = load_object(spec, key, what="class", placeholder="ClassName")
    if not isinstance(cls, type):
        raise InvalidInput(f"{key} {spec!r}: {type(cls).__name__} {spec.rpartition(':')[2]!r} is not a class")
    for method in ("reset", "step"):
        if not callable(getattr(cls, method, None)):
            raise InvalidInput(f"env.class {spec!r}: {cls.__name__} has no {method}() method; an environment needs "
                               "reset(row) and step(action) (docs/agents.md)")
    if getattr(cls, "close", None) is not None and not callable(cls.close):
        raise InvalidInput(f"env.class {spec!r}: {cls.__name__}.close is not a method")
    if env.tools:
        _check_tools(env, cls)
    elif _is_tool_env(cls):
        raise InvalidInput(f"env.class {spec!r} is the tool environment: set env.tools to 'path/to/file.py:TOOLS'")
    kwargs = HostSpec.from_config(env).kwargs
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as exc:
        raise InvalidInput(f"env.kwargs {env.kwargs}: {cls.__name__}(**env.kwargs) does not fit its constructor "
                           f"({exc})") from None
    except ValueError:  # no signature to inspect: the host process will tell
        pass
    _check_in_host(env, spec, sample_row)


def _is_tool_env(cls: type) -> bool:
    from rayrlhf.envs.tools import ToolEnv

    return issubclass(cls, ToolEnv)


def _check_tools(env: Any, cls: type) -> None:
    from rayrlhf.envs.parsers import PARSERS
    from rayrlhf.envs.schema import ToolSchemaError
    from rayrlhf.envs.tools import load_tools, tool_schemas

    if not _is_tool_env(cls):
        raise InvalidInput(f"env.class {env.class_!r} and env.tools are both set, but only the built-in tool "
                           "environment (rayrlhf.envs.tools:ToolEnv or a subclass) takes env.tools: drop one of them")
    clash = sorted(set(env.kwargs) & set(TOOL_ENV_KEYS))
    if clash:
        raise InvalidInput(f"env.kwargs: {clash} are set from env.tools, env.tool_parser, env.tool_timeout_s, "
                           "env.memory_limit_mb and env.step_timeout_s; remove them from env.kwargs")
    if env.tool_parser not in PARSERS:
        raise InvalidInput(f"env.tool_parser {env.tool_parser!r}: unknown; known parsers: {sorted(PARSERS)}")
    try:
        tool_schemas(load_tools(env.tools))
    except ToolSchemaError as exc:
        raise InvalidInput(f"env.tools {env.tools!r}: {exc}") from None


def _check_in_host(env: Any, spec: str, row: dict) -> None:
    host = EnvHost(HostSpec.from_config(env), "env-check")
    try:
        host.reset(CHECK_EPISODE, row).result(timeout=START_TIMEOUT_S + env.step_timeout_s + 5)
    except EnvFailure as failure:
        if failure.where == "init":
            key, what = "env.kwargs", f"constructing {spec.rpartition(':')[2]}(**env.kwargs)"
        else:
            key, what = "env.class", f"{spec.rpartition(':')[2]}.reset(row) on the first row of data.train"
        raise InvalidInput(f"{key}: {what} failed ({failure.kind}): {failure.message}") from None
    finally:
        host.close(CHECK_EPISODE)
        host.shutdown()

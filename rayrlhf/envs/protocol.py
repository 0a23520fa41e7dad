"""What crosses the boundary between an environment host and its caller: results, failures, and the
checks that turn whatever user code returned into plain messages (or a `bad_return` failure).

Imported by the host child process: it must stay light (no torch, Ray or pydantic).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

FAILURE_KINDS = ("raised", "timeout", "crashed", "bad_return")
STEP_SHAPE = "step() must return (observation, reward, done) or (observation, reward, done, info)"
RESET_SHAPE = "reset() must return None, a str (one user message) or a list of messages {'role': str, 'content': str}"


class EnvFailure(Exception):
    """A call into an environment failed; the episode it belongs to is over.

    kind: "raised" (user code raised; `message` ends with the traceback's last lines), "timeout"
    (no answer within env.step_timeout_s), "crashed" (the host process died, or the instance was
    lost with it), "bad_return" (the value had the wrong type; the message says what was expected).
    `where` is the call that failed: "init" (the constructor), "reset", "step" or "close".
    """

    def __init__(self, kind: str, message: str, where: str = "") -> None:
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}")
        super().__init__(f"{kind}: {message}")
        self.kind, self.message, self.where = kind, message, where

    def __reduce__(self) -> tuple:  # keep (kind, message, where) through pickling (processes, Ray)
        return (EnvFailure, (self.kind, self.message, self.where))


@dataclass
class StepResult:
    """One step: the messages to append (the observation), the turn's reward, whether the episode ended,
    and per-turn numbers for metrics (`step_s`: the call's wall time in the host; the tool environment
    adds `tool_calls` and `tool_errors`; a user env may add its own through a fourth return value)."""

    messages: list[dict[str, Any]]
    reward: float
    done: bool
    info: dict[str, float] = field(default_factory=dict)


@dataclass
class HostSpec:
    """What a host process needs to build and run environments: a plain, picklable digest of EnvConfig
    (the child does not import pydantic)."""

    class_spec: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    step_timeout_s: float = 30.0
    memory_limit_mb: int | None = None
    threads: int = 64

    @classmethod
    def from_config(cls, env: Any) -> HostSpec:
        """From an EnvConfig: env.class (or the tool environment, which gets the env.tool* settings as arguments)."""
        if env.class_spec is None:
            raise ValueError("env.class and env.tools are both null: there is no environment to host")
        kwargs = dict(env.kwargs)
        if env.tools is not None:
            kwargs.update(tool_env_kwargs(env))
        return cls(env.class_spec, kwargs, float(env.step_timeout_s), env.memory_limit_mb, int(env.threads_per_process))


TOOL_ENV_KEYS = ("tools", "parser", "tool_timeout_s", "memory_limit_mb", "step_timeout_s")


def tool_env_kwargs(env: Any) -> dict[str, Any]:
    """The constructor arguments the tool environment gets from env.tools, env.tool_parser and the limits."""
    return {"tools": env.tools, "parser": env.tool_parser, "tool_timeout_s": float(env.tool_timeout_s),
            "memory_limit_mb": env.memory_limit_mb, "step_timeout_s": float(env.step_timeout_s)}


class BadReturn(TypeError):
    """Raised by the normalisers; the host reports it as EnvFailure('bad_return')."""


def _type_name(value: Any) -> str:
    return type(value).__name__


def normalize_messages(value: Any, what: str) -> list[dict[str, Any]]:
    """None -> [], a str -> one user message, a list of {'role', 'content'} dicts -> a list of plain dicts."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise BadReturn(f"{what}, got {_type_name(value)}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadReturn(f"{what}; message {i} is a {_type_name(message)}, not a dict")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise BadReturn(f"{what}; message {i} has no 'role' string")
        if not isinstance(content, str):
            raise BadReturn(f"{what}; message {i} ('{role}') has a {_type_name(content)} 'content', not a str")
        out.append(dict(message))
    return out


def normalize_reset(value: Any) -> list[dict[str, Any]]:
    return normalize_messages(value, RESET_SHAPE)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or _type_name(value) == "bool_"  # numpy.bool_ without importing numpy


def normalize_step(value: Any) -> StepResult:
    """Check step()'s return value and turn it into a StepResult (info gets only finite numbers)."""
    if not isinstance(value, tuple) or len(value) not in (3, 4):
        got = f"a tuple of {len(value)}" if isinstance(value, tuple) else _type_name(value)
        raise BadReturn(f"{STEP_SHAPE}, got {got}")
    observation, reward, done = value[:3]
    messages = normalize_messages(observation, f"{STEP_SHAPE}: the observation must be None, a str or a list of messages")
    if _is_bool(reward) or not isinstance(reward, numbers.Real) or not math.isfinite(float(reward)):
        raise BadReturn(f"{STEP_SHAPE}: reward must be a finite float, got {reward!r}")
    if not _is_bool(done):
        raise BadReturn(f"{STEP_SHAPE}: done must be a bool, got {_type_name(done)}")
    info: dict[str, float] = {}
    if len(value) == 4 and value[3] is not None:
        if not isinstance(value[3], dict):
            raise BadReturn(f"{STEP_SHAPE}: info must be a dict of numbers, got {_type_name(value[3])}")
        for key, number in value[3].items():
            if _is_bool(number) or not isinstance(number, numbers.Real):
                raise BadReturn(f"{STEP_SHAPE}: info[{key!r}] must be a number, got {number!r}")
            info[str(key)] = float(number)
    return StepResult(messages, float(reward), bool(done), info)

"""Reward functions: loading `file.py:fn` / `module:fn`, and calling them without losing samples.

A reward function is `fn(prompts, responses, **columns) -> list[float | None]` (docs/design.md).
A sample it cannot score (it returns None for it, raises on it, or the call times out) is
marked None: the orchestrator leaves it out of the update and counts it in `reward/failed`.
The function runs in a child process (`FunctionRunner`), so a call that hangs is stopped at its
timeout instead of holding a thread forever.
"""

from __future__ import annotations

import inspect
import logging
import math
import multiprocessing
import time
from collections.abc import Callable, Sequence
from typing import Any

from rayrlhf.errors import InvalidInput
from rayrlhf.user_code import load_object

log = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float | None]]


def load_reward_function(spec: str, key: str = "reward.function") -> RewardFn:
    """Resolve 'path/to/file.py:fn' or 'package.module:fn' to the function, with errors naming `key` and the spec."""
    fn = load_object(spec, key, what="function", placeholder="fn")
    if not callable(fn):
        target, _, name = spec.rpartition(":")
        raise InvalidInput(f"{key} {spec!r}: {target} has no function {name!r}")
    return fn


def _clean(value: Any) -> float | None:
    """A finite float, or None for anything that is not a usable score."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def check_reward_function(spec: str, columns: list[str], key: str = "reward.function") -> RewardFn:
    """Load `spec` and check it can be called as fn(prompts, responses, **columns); errors name `key`."""
    fn = load_reward_function(spec, key)
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return fn  # a builtin or C callable: nothing to inspect
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind is p.VAR_POSITIONAL for p in params):
        raise InvalidInput(f"{key} {spec!r}: it must take (prompts, responses, **columns) as its first two arguments")
    clash = [c for c in columns if c in {p.name for p in positional[:2]}]
    if clash:
        raise InvalidInput(
            f"{key} {spec!r}: data.train's column(s) {clash} would arrive as keyword arguments, but its first "
            "two parameters take them: it is called as fn(prompts, responses, **columns)"
        )
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    missing = [p.name for p in positional[2:] + [p for p in params if p.kind is p.KEYWORD_ONLY]
               if p.default is p.empty and p.name not in columns]
    if missing:
        raise InvalidInput(
            f"{key} {spec!r}: it needs the column(s) {missing}, which data.train does not have "
            f"(its columns: {sorted(columns)})"
        )
    if not takes_any:
        unused = [c for c in columns if c not in {p.name for p in params}]
        if unused:
            raise InvalidInput(
                f"{key} {spec!r}: data.train's column(s) {unused} are passed as keyword arguments, which it "
                "does not accept; add **kwargs to its signature"
            )
    return fn


def _serve(spec: str, conn: Any) -> None:
    """The child process: load the function once, then answer (prompts, responses, columns) calls."""
    try:
        fn = load_reward_function(spec)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send((False, f"{type(exc).__name__}: {exc}"))
        return
    conn.send((True, "ready"))
    while True:
        message = conn.recv()
        if message is None:
            return
        prompts, responses, columns = message
        try:
            conn.send((True, list(fn(prompts, responses, **columns))))
        except Exception as exc:  # noqa: BLE001 - user code: the parent isolates the failure per sample
            conn.send((False, f"{type(exc).__name__}: {exc}"))


class FunctionRunner:
    """A reward function run in a child process, so that a call that hangs can be stopped and a call that
    kills its process costs only that call.

    Python threads cannot be killed: a timed-out call in a thread runs on forever and keeps its
    thread. Here a call that exceeds `timeout_s` kills the child process, which is started
    again (loading the function anew) for the next call. A child that dies during a call (a crash,
    `os._exit`, the out-of-memory killer) is started again and the call made once more; dying on
    the retry too, the call raises (the caller then scores the samples one by one).
    """

    def __init__(self, spec: str, timeout_s: float = 30.0, start_timeout_s: float = 120.0) -> None:
        self.spec, self.timeout_s, self.start_timeout_s = spec, timeout_s, start_timeout_s
        self.restarts = 0
        self._proc: Any = None
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a threaded (Ray) process
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(self.spec, child), daemon=True, name="reward-function")
        self._proc.start()
        child.close()
        if not self._conn.poll(self.start_timeout_s):
            self.close()
            raise RuntimeError(f"reward.function {self.spec!r}: loading it took over {self.start_timeout_s:.0f}s")
        ok, message = self._conn.recv()
        if not ok:
            self.close()
            raise InvalidInput(f"reward.function {self.spec!r}: {message}")

    def _restart(self, why: str) -> None:
        log.warning("reward function %s: %s; starting its process again", self.spec, why)
        self.close()
        self.restarts += 1
        self._start()

    def __call__(self, prompts: list[str], responses: list[str], columns: dict[str, list]) -> list:
        """One call; TimeoutError past `timeout_s` (the child is killed), RuntimeError when the function raised
        (or its process died twice on this call)."""
        for attempt in (1, 2):
            try:
                self._conn.send((prompts, responses, columns))
                answered = self._conn.poll(self.timeout_s)  # also True when the child died: recv then raises EOFError
                if answered:
                    ok, value = self._conn.recv()
                    break
            except (EOFError, BrokenPipeError, ConnectionResetError) as exc:  # the child died mid-call
                code = self._proc.exitcode if self._proc is not None else None
                self._restart(f"its process died during a call (exit code {code}, {type(exc).__name__})")
                if attempt == 2:
                    raise RuntimeError(f"the reward function's process died twice on this call (exit code {code})") from exc
                continue
            self._restart(f"no answer within {self.timeout_s:g}s")
            raise TimeoutError(f"no answer within {self.timeout_s:g}s")
        if not ok:
            raise RuntimeError(value)
        if len(value) != len(prompts):
            raise ValueError(f"returned {len(value)} rewards for {len(prompts)} samples")
        return value

    def close(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
        if self._proc is not None:
            self._proc.join(timeout=5)
        self._conn.close()


def score_with_function(
    call: Callable[[list[str], list[str], dict[str, list]], list], prompts: list[str], responses: list[str],
    columns: dict[str, list], timeout_s: float = 30.0,
) -> list[float | None]:
    """Score a batch with `call` (a FunctionRunner, or any callable with its signature).

    When the batch call raises, samples are scored one by one so one bad sample costs only itself,
    all within one `timeout_s` budget. A batch call that times out is not retried per sample (each
    retry would wait as long): its samples are unscored (None) and counted by the caller.
    """
    try:
        return [_clean(v) for v in call(prompts, responses, columns)]
    except TimeoutError as exc:
        log.warning("reward function timed out on a batch of %d (%s); its samples are unscored", len(prompts), exc)
        return [None] * len(prompts)
    except Exception as exc:  # noqa: BLE001 - any failure of user code is isolated per sample below
        log.warning("reward function failed on a batch of %d (%s); scoring one by one", len(prompts), exc)
    deadline = time.monotonic() + timeout_s
    scores: list[float | None] = []
    for i in range(len(prompts)):
        if time.monotonic() > deadline:
            log.warning("reward function: per-sample scoring ran out of time; %d samples unscored", len(prompts) - i)
            return scores + [None] * (len(prompts) - i)
        row = {k: [v[i]] for k, v in columns.items()}
        try:
            scores.append(_clean(call([prompts[i]], [responses[i]], row)[0]))
        except TimeoutError:
            log.warning("reward function timed out on sample %d", i)
            return scores + [None] * (len(prompts) - i)
        except Exception as exc:  # noqa: BLE001
            log.warning("reward function failed on sample %d: %s", i, exc)
            scores.append(None)
    return scores

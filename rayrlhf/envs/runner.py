"""Tool functions run in worker processes of their own, with a time and a memory limit.

A tool is user code the *model* drives: it may hang, allocate without bound or crash. Each call
runs in a spawned worker process (RLIMIT_AS), one call at a time per worker; a call past its time
limit kills its worker (a fresh one is started for a later call), so neither the environment host
nor other episodes wait on it. Workers are kept between calls (the tool module is imported once).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from rayrlhf.envs.server import limit_memory
from rayrlhf.user_code import load_object

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0


class ToolTimeout(Exception):
    """The call gave no answer within its time limit (its worker was killed)."""


class ToolFailed(Exception):
    """The tool raised, or its worker died; the message is meant for the model."""


def load_tools(spec: str, key: str = "env.tools") -> list[Callable[..., Any]]:
    """Resolve 'path/to/file.py:TOOLS' to its list of functions (InvalidInput naming `key` when it is not one)."""
    from rayrlhf.errors import InvalidInput

    tools = load_object(spec, key, what="list", placeholder="TOOLS")
    if callable(tools):
        tools = [tools]
    if not isinstance(tools, (list, tuple)) or not tools or not all(callable(t) for t in tools):
        raise InvalidInput(f"{key} {spec!r}: expected a non-empty list of functions, got {type(tools).__name__}")
    return list(tools)


def format_result(value: Any) -> str:
    """What the model reads: a str as it is, other values as JSON (or their str() when not JSON)."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def _worker_main(conn: Any, spec: str, memory_limit_mb: int | None) -> None:
    limit_memory(memory_limit_mb)
    try:
        tools = {fn.__name__: fn for fn in load_tools(spec)}
    except BaseException as exc:  # noqa: BLE001 - reported to the caller
        conn.send((False, f"loading {spec} failed: {exc}"))
        return
    conn.send((True, "ready"))
    while True:
        try:
            name, arguments = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        try:
            reply = (True, format_result(tools[name](**arguments)))
        except BaseException as exc:  # noqa: BLE001 - the model reads it as the tool's error
            reply = (False, f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except Exception as exc:  # noqa: BLE001
            conn.send((False, f"the result could not be sent back ({exc!r})"))


class _Worker:
    def __init__(self, spec: str, memory_limit_mb: int | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, spec, memory_limit_mb), daemon=True, name="tool")
        self.proc.start()
        child.close()
        if not self.conn.poll(START_TIMEOUT_S):
            self.kill()
            raise ToolFailed(f"the tool process did not start within {START_TIMEOUT_S:.0f}s")
        try:
            ok, message = self.conn.recv()
        except (EOFError, OSError):
            self.kill()
            raise ToolFailed(f"the tool process died while starting (exit code {self.proc.exitcode})") from None
        if not ok:
            self.kill()
            raise ToolFailed(message)

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class ToolRunner:
    """Calls tools from `spec` in up to `processes` worker processes (callers beyond wait for a free one)."""

    def __init__(self, spec: str, timeout_s: float, memory_limit_mb: int | None, processes: int = 4) -> None:
        self.spec, self.timeout_s, self.memory_limit_mb = spec, timeout_s, memory_limit_mb
        self._slots = threading.BoundedSemaphore(processes)
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self.killed = 0

    def call(self, name: str, arguments: dict[str, Any], timeout_s: float | None = None) -> str:
        """The tool's result as text; ToolTimeout past `timeout_s` (default: the runner's), ToolFailed otherwise."""
        timeout = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        deadline = time.monotonic() + timeout
        if not self._slots.acquire(timeout=timeout):
            raise ToolTimeout(f"no tool process became free within {timeout:g}s")
        try:
            with self._lock:
                worker = self._idle.pop() if self._idle else None
            if worker is None:
                worker = _Worker(self.spec, self.memory_limit_mb)
            try:
                worker.conn.send((name, arguments))
                if not worker.conn.poll(max(0.0, deadline - time.monotonic())):
                    worker.kill()
                    self.killed += 1
                    raise ToolTimeout(f"no answer within {timeout:g}s")
                ok, value = worker.conn.recv()
            except (EOFError, OSError):
                worker.proc.join(timeout=1)
                code = worker.proc.exitcode
                worker.kill()
                raise ToolFailed(f"the tool process died (exit code {code}); memory limit "
                                 f"{self.memory_limit_mb} MiB") from None
            with self._lock:
                self._idle.append(worker)
        finally:
            self._slots.release()
        if not ok:
            raise ToolFailed(value)
        return value

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.kill()

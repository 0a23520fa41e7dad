"""The environment host process: builds one environment instance per episode and runs its calls.

Started by `EnvHost` with multiprocessing "spawn" (the parent is a threaded Ray actor: never fork).
Synchronous reset/step/close run on a thread pool, coroutines on one event loop thread, so one
process serves many episodes at once. The process limits its own address space (RLIMIT_AS), and
exits when its parent's end of the pipe closes, so it never outlives the rollout worker.

Wire protocol (pickled tuples over one multiprocessing Pipe):
  parent -> child: ("reset"|"step", call_id, episode_id, arg), ("close", episode_id), ("stop",)
  child -> parent: ("ready", pid), ("fatal", message), ("ok", call_id, value),
                   ("err", call_id, kind, message, where), ("closed", episode_id)
A timed-out coroutine is cancelled here; a timed-out synchronous call cannot be, and its late
answer tells the parent that its thread is free again.
"""

from __future__ import annotations

import asyncio
import ctypes
import inspect
import logging
import os
import resource
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rayrlhf.envs.protocol import BadReturn, HostSpec, normalize_reset, normalize_step

log = logging.getLogger("rayrlhf.envs.host")

CLOSE_TIMEOUT_S = 10.0
TRACEBACK_LINES = 8
M_ARENA_MAX = -8  # glibc mallopt parameter


def limit_memory(memory_limit_mb: int | None) -> None:
    """Cap this process's address space, so that a runaway allocation raises MemoryError here.

    glibc gives every thread that allocates its own 64 MiB arena of address space; with dozens of
    threads that alone would exhaust a limit of a few GiB, so arenas are capped first.
    """
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 2)
    except (OSError, AttributeError):  # not glibc
        pass
    if memory_limit_mb:
        limit = int(memory_limit_mb) << 20
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def describe_exception(exc: BaseException) -> str:
    """The exception and the last lines of its traceback: enough to find the bug, short enough for a log."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:  # start at the user's code
        tb = tb.tb_next
    lines = "".join(traceback.format_exception(type(exc), exc, tb)).rstrip().splitlines()
    tail = "\n".join(lines[-TRACEBACK_LINES:])
    return tail


def serve(conn: Any, spec: HostSpec) -> None:
    """Entry point of the host process."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s env-host[{os.getpid()}] %(levelname)s %(message)s")
    limit_memory(spec.memory_limit_mb)
    try:
        from rayrlhf.user_code import load_object

        cls = load_object(spec.class_spec, "env.class", what="class", placeholder="ClassName")
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        hint = ""
        if isinstance(exc, MemoryError) or isinstance(exc.__cause__, MemoryError):
            hint = f" (env.memory_limit_mb={spec.memory_limit_mb} may be too low for what it imports)"
        conn.send(("fatal", f"{exc}{hint}"))
        return
    _Server(conn, cls, spec).run()


class _Server:
    def __init__(self, conn: Any, cls: type, spec: HostSpec) -> None:
        self.conn, self.cls, self.spec = conn, cls, spec
        self.send_lock = threading.Lock()
        self.lock = threading.Lock()  # guards the three fields below
        self.envs: dict[str, Any] = {}
        self.busy: set[str] = set()  # episodes with a call running (perhaps past its timeout)
        self.closing: set[str] = set()  # close() asked while busy: run when the call returns
        self.pool = ThreadPoolExecutor(spec.threads, thread_name_prefix="env-call")
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="env-loop", daemon=True).start()

    def send(self, message: tuple) -> None:
        with self.send_lock:
            self.conn.send(message)

    def run(self) -> None:
        self.send(("ready", os.getpid()))
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the parent is gone: nothing left to serve
                os._exit(0)
            op = message[0]
            if op == "stop":
                self.stop()
            elif op == "close":
                self.close(message[1])
            else:
                _, call_id, episode, arg = message
                with self.lock:
                    self.busy.add(episode)
                self.pool.submit(self.call, op, call_id, episode, arg)

    # ----- calls ------------------------------------------------------------------------------

    def call(self, op: str, call_id: int, episode: str, arg: Any) -> None:
        started = time.perf_counter()
        where = op
        try:
            if op == "reset":
                where = "init"
                env = self.cls(**self.spec.kwargs)
                with self.lock:
                    self.envs[episode] = env
                where = "reset"
            else:
                with self.lock:
                    env = self.envs.get(episode)
                if env is None:
                    self.finish(op, call_id, episode, started, where, error=("crashed", "no such episode in this host"))
                    return
            result = getattr(env, op)(arg)
            if inspect.isawaitable(result):
                future = asyncio.run_coroutine_threadsafe(self.bounded(result), self.loop)
                future.add_done_callback(lambda f: self.finish_future(f, op, call_id, episode, started, where))
                return
        except BaseException as exc:  # noqa: BLE001 - user code: reported as this episode's failure
            self.finish(op, call_id, episode, started, where, exc=exc)
            return
        self.finish(op, call_id, episode, started, where, value=result)

    async def bounded(self, awaitable: Any) -> Any:
        return await asyncio.wait_for(awaitable, self.spec.step_timeout_s)

    def finish_future(self, future: Any, op: str, call_id: int, episode: str, started: float, where: str) -> None:
        try:
            value = future.result()
        except BaseException as exc:  # noqa: BLE001
            self.finish(op, call_id, episode, started, where, exc=exc)
        else:
            self.finish(op, call_id, episode, started, where, value=value)

    def finish(self, op: str, call_id: int, episode: str, started: float, where: str, value: Any = None,
               exc: BaseException | None = None, error: tuple[str, str] | None = None) -> None:
        """Answer the parent, then run a close() that was asked for while this call ran."""
        reply: tuple
        if error is not None:
            reply = ("err", call_id, error[0], error[1], where)
        elif isinstance(exc, (asyncio.TimeoutError, asyncio.CancelledError)):
            reply = ("err", call_id, "timeout", f"{op}() was cancelled after {self.spec.step_timeout_s:g}s", where)
        elif exc is not None:
            message = describe_exception(exc)
            if isinstance(exc, MemoryError):
                message += f"\n(env.memory_limit_mb={self.spec.memory_limit_mb})"
            reply = ("err", call_id, "raised", message, where)
        else:
            try:
                if op == "reset":
                    reply = ("ok", call_id, normalize_reset(value))
                else:
                    result = normalize_step(value)
                    result.info["step_s"] = time.perf_counter() - started
                    reply = ("ok", call_id, result)
            except BadReturn as bad:
                reply = ("err", call_id, "bad_return", str(bad), where)
        try:
            self.send(reply)
        except Exception as send_error:  # noqa: BLE001 - e.g. a message that cannot be pickled
            self.send(("err", call_id, "bad_return", f"{op}() returned a value that cannot be sent between "
                       f"processes ({send_error!r}); return plain str/float/bool/list/dict", where))
        with self.lock:
            self.busy.discard(episode)
            pending_close = episode in self.closing
            self.closing.discard(episode)
        if pending_close:
            self.close(episode)

    # ----- close and stop ---------------------------------------------------------------------

    def close(self, episode: str) -> None:
        with self.lock:
            if episode in self.busy:
                self.closing.add(episode)
                return
            env = self.envs.pop(episode, None)
        self.pool.submit(self.run_close, env, episode)

    def run_close(self, env: Any, episode: str | None = None) -> None:
        """env.close() when it has one; its errors are logged, never raised: the episode is over anyway."""
        fn = getattr(env, "close", None)
        try:
            if not callable(fn):
                return
            result = fn()
            if inspect.isawaitable(result):
                asyncio.run_coroutine_threadsafe(asyncio.wait_for(result, CLOSE_TIMEOUT_S), self.loop).result()
        except BaseException as exc:  # noqa: BLE001
            log.warning("close() of %s failed: %s", type(env).__name__, describe_exception(exc))
        finally:
            if episode is not None:
                self.send(("closed", episode))

    def stop(self) -> None:
        """Close every remaining instance (bounded), then exit."""
        with self.lock:
            envs = list(self.envs.values())
            self.envs.clear()
        futures = [self.pool.submit(self.run_close, env) for env in envs]
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        for future in futures:
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - best effort on the way out
                break
        os._exit(0)

"""`EnvHost`: one environment host process seen from its caller, with Future-returning calls.

The rollout worker calls `reset`/`step` from its threads; they return at once with a
`concurrent.futures.Future` that resolves to the messages / a `StepResult`, or fails with
`EnvFailure(kind, message)`. User code runs in the child process (`server.py`), so:

- an exception fails that call ("raised"), and the episode: later calls on it fail the same way;
- a call that gives no answer within env.step_timeout_s fails ("timeout"). A synchronous call
  cannot be stopped, so its thread is *leaked*: the process is then retired (new episodes go to a
  fresh process) and ended once its last episode is closed and its leaked calls returned (or
  RETIRE_GRACE_S after that last close), or at once when `max_leaked` threads are stuck (its other
  episodes then fail "crashed");
- a dead process (os._exit, segfault, the OOM killer) fails every call in flight there and every
  episode whose instance lived there ("crashed"); the next reset starts a new process.

Each process is one *generation* (`_Process`); the host starts a new one whenever the current one
is dead or retired. Future callbacks run on the generation's reader thread: keep them short.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing
import queue
import signal
import threading
import time
import weakref
from concurrent.futures import Future
from multiprocessing.reduction import ForkingPickler
from typing import Any

from rayrlhf.envs.protocol import EnvFailure, HostSpec, StepResult
from rayrlhf.envs.server import serve

log = logging.getLogger(__name__)

TICK_S = 0.05  # how often the reader thread checks deadlines
START_TIMEOUT_S = 120.0  # spawn + imports + loading env.class
MAX_LEAKED = 8
RETIRE_GRACE_S = 60.0  # how long a retired process with no live episode waits for its leaked calls
_ALL_HOSTS: weakref.WeakSet[EnvHost] = weakref.WeakSet()
_atexit_registered = False


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "it stopped answering"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        why = {"SIGKILL": " (the out-of-memory killer, or a kill)", "SIGSEGV": " (a segfault in native code)"}
        return f"killed by {name}{why.get(name, '')}"
    return f"it exited with code {exitcode} (sys.exit or os._exit in user code?)"


class _Call:
    __slots__ = ("future", "episode", "op", "deadline")

    def __init__(self, future: Future, episode: str, op: str, deadline: float | None) -> None:
        self.future, self.episode, self.op, self.deadline = future, episode, op, deadline


class _Process:
    """One generation: a child process, its pipe, the calls it owes and the episodes whose instances it holds.

    Every field is guarded by the host's lock; futures are resolved outside it.
    """

    def __init__(self, host: EnvHost, generation: int) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a threaded process
        self.host, self.generation = host, generation
        self.conn, child = ctx.Pipe()
        # not daemonic: a daemonic process may not start the tool environment's tool processes
        self.proc = ctx.Process(target=serve, args=(child, host.spec), name=f"{host.name}-{generation}", daemon=False)
        self.proc.start()
        child.close()
        self.pid: int | None = None
        self.pending: dict[int, _Call] = {}
        self.leaked: set[int] = set()  # timed-out calls still running in the child
        self.episodes: set[str] = set()  # live episodes
        self.closing: set[str] = set()  # closed by the caller, close() not yet done in the child
        self.ready = False
        self.dead = False
        self.retired = False
        self.retired_at = 0.0
        self.started = time.monotonic()
        self.outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        threading.Thread(target=self._write, name=f"{host.name}-{generation}-send", daemon=True).start()
        threading.Thread(target=self._read, name=f"{host.name}-{generation}-recv", daemon=True).start()

    # ----- pipe ------------------------------------------------------------------------------

    def _write(self) -> None:
        while True:
            data = self.outbox.get()
            if data is None:
                return
            try:
                self.conn.send_bytes(data)
            except (OSError, ValueError):
                self.host._lost(self, "its pipe broke")
                return

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv() if self.conn.poll(TICK_S) else None
            except (EOFError, OSError):
                self.host._lost(self, None)
                return
            if message is not None:
                self.host._answer(self, message)
            if self.host._tick(self):
                return

    def send(self, message: tuple) -> None:
        self.outbox.put(bytes(ForkingPickler.dumps(message)))

    def kill(self) -> None:
        self.outbox.put(None)
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class EnvHost:
    """One environment host process (restarted as needed) behind a non-blocking, thread-safe API."""

    def __init__(self, spec: HostSpec, name: str = "env-host", max_leaked: int = MAX_LEAKED) -> None:
        self.spec, self.name, self.max_leaked = spec, name, max_leaked
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._generations = itertools.count()
        self._current: _Process | None = None
        self._procs: list[_Process] = []  # generations not ended yet
        self._episodes: dict[str, _Process] = {}
        self._busy: set[str] = set()  # episodes with a call in flight (one at a time)
        self._failed: dict[str, EnvFailure] = {}  # failed episodes: their later calls fail the same way
        self._closed = False
        self.counts = {"crashes": 0, "recycles": 0, "timeouts": 0}
        _register(self)

    # ----- public API ---------------------------------------------------------------------------

    def reset(self, episode_id: str, row: dict) -> Future[list[dict]]:
        """Build the episode's environment and call reset(row); resolves to the messages before the first turn."""
        with self._lock:
            self._check_open()
            if episode_id in self._episodes or episode_id in self._failed:
                raise ValueError(f"episode {episode_id!r} is already running on {self.name}: ids must be unique")
            proc = self._current
            if proc is None or proc.dead or proc.retired:
                proc = self._current = _Process(self, next(self._generations))
                self._procs.append(proc)
            proc.episodes.add(episode_id)
            self._episodes[episode_id] = proc
            return self._submit(proc, "reset", episode_id, row)

    def step(self, episode_id: str, action: str) -> Future[StepResult]:
        """Call step(action) on the episode's environment; resolves to a StepResult."""
        with self._lock:
            self._check_open()
            failure = self._failed.get(episode_id)
            if failure is not None:
                return _failed_future(EnvFailure(failure.kind, f"the episode already failed: {failure.message}", "step"))
            proc = self._episodes.get(episode_id)
            if proc is None:
                raise ValueError(f"episode {episode_id!r} is not running on {self.name} (reset it first)")
            if proc.dead:
                failure = EnvFailure("crashed", "its environment instance was lost when its host process died", "step")
                self._failed[episode_id] = failure
                return _failed_future(failure)
            return self._submit(proc, "step", episode_id, action)

    def close(self, episode_id: str) -> None:
        """End the episode: its environment's close() runs in the host (after a call still running there)."""
        with self._lock:
            self._failed.pop(episode_id, None)
            proc = self._episodes.pop(episode_id, None)
            if proc is None or proc.dead:
                return
            proc.episodes.discard(episode_id)
            proc.closing.add(episode_id)
            proc.send(("close", episode_id))

    def shutdown(self) -> None:
        """Stop every host process (their remaining instances are closed, bounded); later calls raise."""
        with self._lock:
            self._closed = True
            procs = list(self._procs)
            self._episodes.clear()
        for proc in procs:
            if not proc.dead:
                proc.send(("stop",))
                proc.proc.join(timeout=15)
            self._end(proc, "the host was shut down")

    def stats(self) -> dict[str, int]:
        """Counters for metrics: crashes, recycles, timeouts; leaked threads and live episodes now."""
        with self._lock:
            leaked = sum(len(p.leaked) for p in self._procs)
            return {**self.counts, "leaked": leaked, "episodes": len(self._episodes), "processes": len(self._procs)}

    @property
    def pid(self) -> int | None:
        """The current host process's pid (None before it started)."""
        proc = self._current
        return proc.pid if proc is not None and not proc.dead else None

    # ----- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name} is shut down")

    def _submit(self, proc: _Process, op: str, episode_id: str, arg: Any) -> Future:
        """Send one call (lock held)."""
        if episode_id in self._busy:
            raise RuntimeError(f"episode {episode_id!r} already has a call in flight; wait for its future first")
        call_id = next(self._ids)
        future: Future = Future()
        deadline = time.monotonic() + self.spec.step_timeout_s if proc.ready else None
        proc.send((op, call_id, episode_id, arg))
        proc.pending[call_id] = _Call(future, episode_id, op, deadline)
        self._busy.add(episode_id)
        return future

    def _settle(self, call: _Call, result: Any = None, failure: EnvFailure | None = None) -> None:
        """Resolve a call's future (lock NOT held: callbacks run here)."""
        if failure is None:
            call.future.set_result(result)
        else:
            call.future.set_exception(failure)

    def _finished(self, call: _Call, failure: EnvFailure | None) -> None:
        """Book-keeping for a call that is over (lock held)."""
        self._busy.discard(call.episode)
        if failure is not None and call.episode in self._episodes:
            self._failed[call.episode] = failure

    def _answer(self, proc: _Process, message: tuple) -> None:
        """A message from the child (reader thread)."""
        tag = message[0]
        settle: tuple[_Call, Any, EnvFailure | None] | None = None
        fatal: str | None = None
        with self._lock:
            if tag == "ready":
                proc.ready, proc.pid = True, message[1]
                now = time.monotonic()
                for call in proc.pending.values():
                    call.deadline = now + self.spec.step_timeout_s
            elif tag == "fatal":
                fatal = message[1]
            elif tag == "closed":
                proc.closing.discard(message[1])
            else:
                call_id = message[1]
                proc.leaked.discard(call_id)  # a late answer: the thread it held is free again
                call = proc.pending.pop(call_id, None)
                if call is not None:
                    failure = EnvFailure(message[2], message[3], message[4]) if tag == "err" else None
                    if failure is not None and failure.kind == "timeout":  # a coroutine the child cancelled
                        self.counts["timeouts"] += 1
                    self._finished(call, failure)
                    settle = (call, message[2] if tag == "ok" else None, failure)
        if fatal is not None:
            self._end(proc, None, EnvFailure("raised", f"the environment host could not load env.class: {fatal}", "init"))
        elif settle is not None:
            self._settle(*settle)

    def _tick(self, proc: _Process) -> bool:
        """Deadlines and liveness, every TICK_S (reader thread); True when the generation is over."""
        now = time.monotonic()
        expired: list[tuple[_Call, EnvFailure]] = []
        recycle = False
        with self._lock:
            if proc.dead:
                return True
            late_start = not proc.ready and now - proc.started > START_TIMEOUT_S
            alive = proc.proc.is_alive()
            if alive and not late_start:
                for call_id, call in list(proc.pending.items()):
                    if call.deadline is not None and now > call.deadline:
                        del proc.pending[call_id]
                        proc.leaked.add(call_id)
                        failure = EnvFailure("timeout", f"{call.op}() gave no answer within "
                                             f"{self.spec.step_timeout_s:g}s (env.step_timeout_s)", call.op)
                        self._finished(call, failure)
                        expired.append((call, failure))
                self.counts["timeouts"] += len(expired)
                if expired and not proc.retired:
                    proc.retired, proc.retired_at = True, now  # fresh episodes go to a fresh process from now on
                idle = not proc.episodes and (not (proc.closing or proc.leaked) or now - proc.retired_at > RETIRE_GRACE_S)
                recycle = proc.retired and (len(proc.leaked) >= self.max_leaked or idle)
                leaked = len(proc.leaked)
        for call, failure in expired:
            self._settle(call, failure=failure)
        if late_start:
            self._lost(proc, f"it did not start within {START_TIMEOUT_S:.0f}s")
        elif not alive:
            self._lost(proc, None)
        elif recycle:
            reason = f"recycled with {leaked} call(s) still running past their timeout"
            log.warning("%s: host process %s %s", self.name, proc.pid, reason)
            self._end(proc, f"the environment host process was {reason}", recycled=True)
        else:
            return False
        return True

    def _lost(self, proc: _Process, reason: str | None) -> None:
        """The child died or stopped answering: everything it held fails "crashed"."""
        with self._lock:
            if proc.dead:
                return
        proc.proc.join(timeout=1)
        why = reason or describe_exit(proc.proc.exitcode)
        with self._lock:
            if self._closed:  # it exited because shutdown() asked it to
                why = "the host was shut down"
            else:
                log.warning("%s: host process %s died: %s", self.name, proc.pid, why)
                self.counts["crashes"] += 1
        self._end(proc, f"the environment host process died: {why}")

    def _end(self, proc: _Process, reason: str | None, failure: EnvFailure | None = None,
             recycled: bool = False) -> None:
        """Kill a generation and fail what it owed (with `failure`, or "crashed" with `reason`)."""
        with self._lock:
            if proc.dead:
                return
            proc.dead = True
            if proc in self._procs:
                self._procs.remove(proc)
            if recycled:
                self.counts["recycles"] += 1
            calls = list(proc.pending.values())
            proc.pending.clear()
            failures = []
            for call in calls:
                f = failure or EnvFailure("crashed", reason or "the host process was stopped", call.op)
                self._finished(call, f)
                failures.append((call, f))
        proc.kill()
        for call, f in failures:
            self._settle(call, failure=f)


def _failed_future(failure: EnvFailure) -> Future:
    future: Future = Future()
    future.set_exception(failure)
    return future


def _register(host: EnvHost) -> None:
    """Host processes are not daemonic (they start tool processes), so the interpreter's exit would wait for
    them: stop them first. Registered after multiprocessing's own exit hook, so it runs before it."""
    global _atexit_registered
    _ALL_HOSTS.add(host)
    if not _atexit_registered:
        import multiprocessing.util  # noqa: F401 - its atexit hook must be registered before ours

        atexit.register(_shutdown_all)
        _atexit_registered = True


def _shutdown_all() -> None:
    for host in list(_ALL_HOSTS):
        with host._lock:
            procs = list(host._procs)
        for proc in procs:
            proc.kill()

"""What the driver needs to diagnose an actor that died or hangs: what a failed call means, where the
actor runs, and its stacks.

`identity()` is asked once an actor is up (a hung actor may not answer later). A hung actor's
stacks are read from outside by `py-spy dump`, run as a Ray task on the actor's node, so it
works on a cluster and on a process stuck in C code holding the GIL; an actor that still
answers can also report its own threads (`thread_stacks`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import traceback

import ray


def identity() -> tuple[str, int]:
    """(Ray node id, process id) of the calling actor."""
    return ray.get_runtime_context().get_node_id(), os.getpid()


def thread_stacks() -> str:
    """Every Python thread's stack in this process, innermost frame last."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f"Thread {ident} ({names.get(ident, '?')}):\n" + "".join(traceback.format_stack(frame)))
    return "\n".join(parts)


@ray.remote(num_cpus=0, max_retries=0)
def py_spy_dump(pid: int, timeout_s: float = 30.0) -> str:
    """`py-spy dump` of process `pid` on this node (every thread, with native frames' Python callers)."""
    exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(exe):
        raise FileNotFoundError("py-spy is not installed on this node (pip install py-spy)")
    done = subprocess.run([exe, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"py-spy dump --pid {pid} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


# What a failed call means. DIED: the process is gone (Ray restarts it if it has restarts left).
# UNAVAILABLE: the actor cannot be reached (restarting, or a transient outage: its process may be alive).
# TIMEOUT: no answer within the bound. COMM: a collective failed because a peer went away. ERROR: the actor's
# own code raised (an engine that failed, a bad request).
DIED, UNAVAILABLE, TIMEOUT, COMM, ERROR = "died", "unavailable", "timeout", "comm", "error"

# How gloo and NCCL report a peer that went away mid-collective.
_COMM_SIGNS = ("connection closed by peer", "connection reset by peer", "broken pipe", "gloo", "nccl",
               "socket timeout", "distbackenderror", "distnetworkerror", "timed out waiting")


def classify(exc: BaseException) -> str:
    """DIED, UNAVAILABLE, TIMEOUT, COMM or ERROR (see above)."""
    if isinstance(exc, ray.exceptions.ActorUnavailableError):
        return UNAVAILABLE
    if isinstance(exc, ray.exceptions.RayActorError):
        return DIED
    if isinstance(exc, (ray.exceptions.GetTimeoutError, TimeoutError)):
        return TIMEOUT
    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None else exc
    import torch.distributed as dist

    if isinstance(cause, getattr(dist, "DistError", ())) or any(s in repr(cause).lower() for s in _COMM_SIGNS):
        return COMM
    return ERROR

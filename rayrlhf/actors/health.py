"""What the driver needs to diagnose an actor that died or hangs: where it runs, and its stacks.

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

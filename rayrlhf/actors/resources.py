"""CPU threads and cores of an actor process.

In the on-policy loop generation and training take turns, so each phase may use every core of
the node (the default thread counts share the cores among the actors of one group). Where
phases run at the same time (the asynchronous mode, or a GPU cluster's separate pools), actors
can be pinned to disjoint cores from config.
"""

from __future__ import annotations

import os
from pathlib import Path

SMALL_MODEL_BYTES = 20 * 1024**2  # below this, one thread per process is faster (threading overhead dominates)


def checkpoint_bytes(path: str | Path) -> int | None:
    """Size of a local checkpoint's weights on disk; None for a hub id or an unknown layout."""
    folder = Path(str(path))
    files = [*folder.glob("*.safetensors"), *folder.glob("*.bin")] if folder.is_dir() else []
    return sum(f.stat().st_size for f in files) if files else None


def default_threads(model_path: str | Path, processes: int, cores: int | None = None) -> int:
    """Threads per process when the config leaves it open: one for a small model, else the cores (the
    node's, or the `cores` the processes are pinned to) shared by `processes` that may compute at once."""
    size = checkpoint_bytes(model_path)
    if size is not None and size < SMALL_MODEL_BYTES:
        return 1
    return max(1, (cores or cpu_cores()) // processes)


def cpu_cores() -> int:
    """Cores this process may run on (its affinity set, else the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def pin_to_cores(cores: list[int] | None) -> None:
    """Restrict this process (and the threads it starts) to `cores`; None leaves it as it is."""
    if cores:
        os.sched_setaffinity(0, set(cores))

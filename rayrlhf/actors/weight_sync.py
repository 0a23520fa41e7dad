"""Versioned weight sync from the policy trainer group to the rollout workers.

Buckets are pipelined: rank 0 gathers bucket k + 1 (layer by layer under ZeRO-3) while the
workers load bucket k. Each bucket is stored once in the object store and read zero-copy by
every worker on the node. A verification compares per-tensor checksums on both sides.

Two transports sit behind `broadcast_weights`: "object_store" (above; the faster one on CPU,
where workers read the buckets zero-copy) and "collective", a broadcast process group from
policy rank 0 to the workers -- gloo on CPU, NCCL where the workers sit on GPUs (see
`rayrlhf.actors.collective`; the NCCL path could not be run here, no GPU).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import ray

from rayrlhf.actors.weights import compare_checksums

log = logging.getLogger(__name__)


class WeightSyncError(RuntimeError):
    """A rollout worker's weights differ from the trainer's after a sync."""


BACKENDS = ("object_store", "collective")


def broadcast_weights(
    group: Any, workers: Sequence[Any], version: int, bucket_bytes: int, dtype: str | None,
    backend: str = "object_store", timeout_s: float | None = None,
) -> int:
    """Push the policy group's full weights into every worker and set their `weight_version`.

    Returns the number of buckets streamed ("object_store") or of tensors broadcast ("collective").
    Each wait on the workers raises ray's GetTimeoutError after `timeout_s` (None: no limit).
    """
    if backend == "collective":
        sent = group.broadcast_weights_collective(list(workers), version, dtype, bucket_bytes)
        log.debug("weight sync v%d: %d tensor(s) broadcast to %d worker(s)", version, sent, len(workers))
        return sent
    if backend != "object_store":
        raise ValueError(f"unknown weight sync backend {backend!r}; valid backends are {list(BACKENDS)}")
    _, aliases = group.weight_layout(dtype)
    ray.get([w.begin_weight_update.remote(aliases) for w in workers], timeout=timeout_s)
    loads = []
    moved = 0
    for bucket_ref in group.iter_weight_buckets(bucket_bytes, dtype):
        loads += [w.load_weights.remote(bucket_ref) for w in workers]
        moved += 1
    group.finish_weight_stream()
    ray.get(loads, timeout=timeout_s)
    ray.get([w.finish_weight_update.remote(version) for w in workers], timeout=timeout_s)
    log.debug("weight sync v%d: %d bucket(s) to %d worker(s)", version, moved, len(workers))
    return moved


def verify_weights(group: Any, workers: Sequence[Any], dtype: str | None, timeout_s: float | None = None) -> None:
    """Raise WeightSyncError unless every worker holds exactly the trainer's weights.

    Each worker reports the checksum of every piece it holds (one per tensor, or one slice per
    tensor-parallel rank), under checkpoint names; the trainer hashes the same pieces of its
    full tensors. Every tensor of the trainer must be held whole (tied aliases may be held
    through the tensor they share), and nothing else.
    """
    meta, aliases = group.weight_layout(dtype)
    shapes = {name: shape for name, shape, _ in meta}
    shapes.update({alias: shapes[canonical] for alias, canonical in aliases.items()})
    reports = ray.get([w.checksums.remote(list(shapes)) for w in workers], timeout=timeout_s)
    keys = sorted({key for report in reports for key in report})
    expected = group.checksums(dtype, keys)
    for i, actual in enumerate(reports):
        problems = compare_checksums(expected, shapes, aliases, actual)
        if problems:
            shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
            raise WeightSyncError(f"rollout worker {i}: {len(problems)} tensor(s) differ from the trainer after the sync: {shown}")

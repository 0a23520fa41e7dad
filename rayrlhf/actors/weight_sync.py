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

from rayrlhf.actors.weights import checksum_mismatches

log = logging.getLogger(__name__)


class WeightSyncError(RuntimeError):
    """A rollout worker's weights differ from the trainer's after a sync."""


BACKENDS = ("object_store", "collective")


def broadcast_weights(
    group: Any, workers: Sequence[Any], version: int, bucket_bytes: int, dtype: str | None,
    backend: str = "object_store",
) -> int:
    """Push the policy group's full weights into every worker and set their `weight_version`.

    Returns the number of buckets streamed ("object_store") or of tensors broadcast ("collective").
    """
    if backend == "collective":
        sent = group.broadcast_weights_collective(list(workers), version, dtype, bucket_bytes)
        log.debug("weight sync v%d: %d tensor(s) broadcast to %d worker(s)", version, sent, len(workers))
        return sent
    if backend != "object_store":
        raise ValueError(f"unknown weight sync backend {backend!r}; valid backends are {list(BACKENDS)}")
    ray.get([w.begin_weight_update.remote() for w in workers])
    loads = []
    moved = 0
    for bucket_ref in group.iter_weight_buckets(bucket_bytes, dtype):
        loads += [w.load_weights.remote(bucket_ref) for w in workers]
        moved += 1
    group.finish_weight_stream()
    ray.get(loads)
    ray.get([w.finish_weight_update.remote(version) for w in workers])
    log.debug("weight sync v%d: %d bucket(s) to %d worker(s)", version, moved, len(workers))
    return moved


def verify_weights(group: Any, workers: Sequence[Any], dtype: str | None) -> None:
    """Raise WeightSyncError unless every worker's per-tensor checksums equal the trainer's."""
    expected = group.checksums(dtype)
    for i, actual in enumerate(ray.get([w.checksums.remote() for w in workers])):
        bad = checksum_mismatches(expected, actual)
        if bad:
            raise WeightSyncError(f"rollout worker {i}: {len(bad)} tensors differ from the trainer after the sync, e.g. {bad[:3]}")

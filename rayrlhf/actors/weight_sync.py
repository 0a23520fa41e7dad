"""Versioned weight sync from the policy trainer group to the rollout workers.

Buckets are pipelined: rank 0 gathers bucket k + 1 (layer by layer under ZeRO-3) while the
workers load bucket k. Each bucket is stored once in the object store and read zero-copy by
every worker on the node. A verification compares per-tensor checksums on both sides.
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


def broadcast_weights(group: Any, workers: Sequence[Any], version: int, bucket_bytes: int, dtype: str | None) -> int:
    """Push the policy group's full weights into every worker and set their `weight_version`; returns bytes moved."""
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

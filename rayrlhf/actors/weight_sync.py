"""Versioned weight sync from the policy trainer group to the rollout workers.

Buckets are pipelined: rank 0 gathers bucket k + 1 (layer by layer under ZeRO-3) while the
workers load bucket k. Each bucket is stored once in the object store and read zero-copy by
every worker on the node. A verification compares per-tensor checksums on both sides.

Two transports sit behind `broadcast_weights`: "object_store" (above; the faster one on CPU,
where workers read the buckets zero-copy) and "collective", a broadcast process group from
policy rank 0 to the workers -- gloo on CPU, NCCL where the workers sit on GPUs (see
`rayrlhf.actors.collective`; the NCCL path could not be run here, no GPU).

Every wait is bounded, and a failure is blamed on the side it happened on: a worker whose part
failed or did not finish in time is reported in `SyncResult.failed` (the caller takes it out of
service; the others got the weights), while a trainer rank that died, hung or broke its stream
raises `TrainerFailed` from the group.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray

from rayrlhf.actors.weights import compare_checksums

log = logging.getLogger(__name__)


class WeightSyncError(RuntimeError):
    """A rollout worker's weights differ from the trainer's after a sync."""


BACKENDS = ("object_store", "collective")


@dataclass
class SyncResult:
    """What a sync did: how much it moved, which workers hold the new weights (`synced`, indices in `workers`),
    which failed (index -> (fault kind, message); the others were not reached and may be tried again), and, when
    asked to retain them, the buckets it moved (object refs, for a worker that restarts later)."""

    moved: int = 0
    synced: list[int] = field(default_factory=list)
    failed: dict[int, tuple[str, str]] = field(default_factory=dict)
    buckets: list[Any] | None = None


def settle(refs: dict[int, list[Any]], deadline: float) -> dict[int, tuple[str, str]]:
    """Wait for every worker's calls until `deadline` (monotonic); {worker: (kind, message)} for each worker
    whose call failed (first error) or had not finished by then (a hang)."""
    from rayrlhf.actors.health import TIMEOUT, classify

    owner = {ref: i for i, rs in refs.items() for ref in rs}
    failed: dict[int, tuple[str, str]] = {}
    pending = list(owner)
    while pending:
        wait_s = None if deadline == float("inf") else max(0.0, deadline - time.monotonic())
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=wait_s)
        for ref in done:
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - blamed on the worker that made the call
                cause = getattr(exc, "cause", None) or exc  # the actor's own error, not Ray's traceback of it
                failed.setdefault(owner[ref], (classify(exc), f"{type(cause).__name__}: {cause}"[:600]))
        if pending and time.monotonic() >= deadline:
            for ref in pending:
                failed.setdefault(owner[ref], (TIMEOUT, "no answer within faults.sync_timeout_s"))
            break
    return failed


def engine_dtype(workers: Sequence[Any], timeout_s: float | None = None) -> str:
    """The dtype the rollout engines compute in, as each resolved it where it runs ('auto' is bfloat16 on a
    GPU node, float32 on a CPU one): the dtype weights travel in. The driver cannot decide it, since it may
    run on a node without a GPU. Engines that disagree are refused, naming rollout.dtype."""
    from rayrlhf.errors import InvalidInput

    dtypes = ray.get([w.weight_dtype.remote() for w in workers], timeout=timeout_s)
    if len(set(dtypes)) > 1:
        raise InvalidInput(f"the rollout workers compute in different dtypes ({', '.join(dtypes)}, by worker): "
                           "set rollout.dtype to one of them")
    return dtypes[0]


def broadcast_weights(
    group: Any, workers: Sequence[Any], version: int, bucket_bytes: int, dtype: str | None,
    backend: str = "object_store", timeout_s: float | None = None, retain: bool = False,
) -> SyncResult:
    """Push the policy group's full weights into every worker and set their `weight_version`.

    `timeout_s` bounds each phase (None: no limit). Workers that fail are listed in the result and get
    nothing more from this sync; the trainer side raising means no worker can be trusted to hold `version`.
    `retain` keeps the object-store buckets (see `push_buckets`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown weight sync backend {backend!r}; valid backends are {list(BACKENDS)}")
    timeout = float("inf") if timeout_s is None else timeout_s
    if backend == "collective":  # the group's own waits need a finite bound: gloo/NCCL's default when none is given
        from rayrlhf.actors.collective import DEFAULT_TIMEOUT_S

        result = group.broadcast_weights_collective(list(workers), version, dtype, bucket_bytes,
                                                    DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)
        log.debug("weight sync v%d: %d tensor(s) broadcast to %d worker(s)", version, result.moved, len(workers))
        return result
    _, aliases = group.weight_layout(dtype)
    result = SyncResult(buckets=[] if retain else None)
    result.failed = settle({i: [w.begin_weight_update.remote(aliases)] for i, w in enumerate(workers)},
                           time.monotonic() + timeout)
    loads: dict[int, list[Any]] = {i: [] for i in range(len(workers)) if i not in result.failed}
    for bucket_ref in group.stream_weight_buckets(bucket_bytes, dtype):  # bounded by the group's watch timeout
        for i in loads:
            loads[i].append(workers[i].load_weights.remote(bucket_ref))
        if result.buckets is not None:
            result.buckets.append(bucket_ref)
        result.moved += 1
    result.failed |= settle(loads, time.monotonic() + timeout)
    finishing = {i: [workers[i].finish_weight_update.remote(version)] for i in loads if i not in result.failed}
    result.failed |= settle(finishing, time.monotonic() + timeout)
    result.synced = [i for i in range(len(workers)) if i not in result.failed]
    log.debug("weight sync v%d: %d bucket(s) to %d worker(s)", version, result.moved, len(workers))
    return result


def push_buckets(buckets: list[Any], aliases: dict[str, str], workers: Sequence[Any], version: int,
                 timeout_s: float) -> dict[int, tuple[str, str]]:
    """Load buckets kept from an earlier sync (`broadcast_weights(retain=True)`) into `workers` as `version`:
    how a worker that restarted rejoins a rollout sampling with weights the trainers have moved past."""
    failed = settle({i: [w.begin_weight_update.remote(aliases)] for i, w in enumerate(workers)}, time.monotonic() + timeout_s)
    loads = {i: [w.load_weights.remote(b) for b in buckets] for i, w in enumerate(workers) if i not in failed}
    failed |= settle(loads, time.monotonic() + timeout_s)
    finishing = {i: [workers[i].finish_weight_update.remote(version)] for i in loads if i not in failed}
    return failed | settle(finishing, time.monotonic() + timeout_s)


def verify_weights(group: Any, workers: Sequence[Any], dtype: str | None, timeout_s: float | None = None,
                   expected_of: Any = None) -> dict[int, tuple[str, str]]:
    """Raise WeightSyncError unless every worker that answers holds exactly the trainer's weights; returns the
    workers that did not answer in time or failed (index -> (kind, message)), like `broadcast_weights`.

    Each worker reports the checksum of every piece it holds (one per tensor, or one slice per
    tensor-parallel rank), under checkpoint names; the trainer hashes the same pieces of its
    full tensors (or `expected_of(keys)` does, for weights the trainer no longer holds). Every
    tensor of the trainer must be held whole (tied aliases may be held through the tensor they
    share), and nothing else.
    """
    meta, aliases = group.weight_layout(dtype)
    shapes = {name: shape for name, shape, _ in meta}
    shapes.update({alias: shapes[canonical] for alias, canonical in aliases.items()})
    refs = {i: [w.checksums.remote(list(shapes))] for i, w in enumerate(workers)}
    failed = settle(refs, time.monotonic() + (float("inf") if timeout_s is None else timeout_s))
    reports = {i: ray.get(rs[0]) for i, rs in refs.items() if i not in failed}
    if not reports:
        return failed
    keys = sorted({key for report in reports.values() for key in report})
    expected = expected_of(keys) if expected_of is not None else group.checksums(dtype, keys)
    for i, actual in reports.items():
        problems = compare_checksums(expected, shapes, aliases, actual)
        if problems:
            shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
            raise WeightSyncError(f"rollout worker {i}: {len(problems)} tensor(s) differ from the trainer after the sync: {shown}")
    return failed

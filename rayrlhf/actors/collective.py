"""The collective weight-sync transport: a broadcast process group from policy rank 0 to the workers.

The group is independent of every default process group (DeepSpeed owns the trainer's; vLLM may
own the worker's): trainer rank 0 hosts a `TCPStore` on a free port, the rollout workers
connect to it as clients, and each member constructs the backend object directly on a
`PrefixStore` named after the group -- `ProcessGroupGloo` for CPU tensors, `ProcessGroupNCCL`
where the members sit on GPUs. The world is 1 + the number of workers; trainer rank 0 is rank
and root 0, worker i is rank i + 1.

Protocol of one sync (driven by `TrainerGroup.broadcast_weights_collective`)::

    meta, aliases = rank0.weight_layout(dtype)      # [(checkpoint name, shape, dtype)], no gather
    workers: begin_weight_update(aliases)           # the engine loop pauses
    concurrently:
        every trainer rank: broadcast_weights(dtype)  # lockstep ZeRO-3 gathers; rank 0 broadcasts
        every worker: receive_weights(meta, bucket_bytes)  # preallocate, receive in order, load
    workers: finish_weight_update(version)

Both sides walk the same order (`meta`), one broadcast per tensor. On CPU the object-store path
(`weight_sync.broadcast_weights` with backend "object_store") is faster: it stores each bucket
once and every worker on the node reads it zero-copy, while gloo copies every tensor over TCP
to each worker. The collective path pays off with GPU workers on NCCL; that path is written for
them but could not be run here (no GPU was available; only gloo on CPU is tested). With CUDA
workers the received tensors still enter the engine through the numpy `Bucket` format, i.e. via
host memory.

A broadcast that never completes (a member died) blocks the others until the group's timeout;
shut the trainer group down (its ranks are killed after a grace period) and kill the workers.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
Metadata = list[tuple[str, tuple[int, ...], torch.dtype]]


class WeightGroup:
    """One member of a broadcast group; rank 0 hosts the store (create it before the others can join)."""

    def __init__(
        self, addr: str, port: int, world_size: int, rank: int, group_name: str, device: torch.device | str = "cpu",
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.rank, self.world_size, self.group_name = rank, world_size, group_name
        self.device = torch.device(device)
        timeout = datetime.timedelta(seconds=timeout_s)
        self._tcp = dist.TCPStore(addr, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
        store = dist.PrefixStore(f"rayrlhf-weights/{group_name}", self._tcp)
        if self.device.type == "cuda":
            if not hasattr(dist, "ProcessGroupNCCL"):
                raise RuntimeError("a CUDA weight group needs a torch build with NCCL")
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.backend = "nccl"
            self.pg: Any = dist.ProcessGroupNCCL(store, rank, world_size, opts)
        else:
            self.backend = "gloo"
            self.pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)  # connects to every member
        log.info("weight group %r: rank %d/%d joined (%s)", group_name, rank, world_size, self.backend)

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Broadcast `tensor` in place from root 0 (contiguous, on this member's device)."""
        self.pg.broadcast([tensor], dist.BroadcastOptions()).wait()

    def destroy(self) -> None:
        """Leave without waiting for peers: abort pending work, drop the backend and the store."""
        pg, self.pg = self.pg, None
        if pg is not None:
            try:
                pg.abort() if self.backend == "nccl" else pg.shutdown()
            except Exception as exc:  # best effort: the peers may already be gone
                log.debug("weight group %r: teardown: %r", self.group_name, exc)
        self._tcp = None

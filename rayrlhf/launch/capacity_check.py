"""`rayrlhf train`'s capacity check: the planner run against the cluster Ray reports, before any actor starts.

The cluster is read after connecting: each alive node's GPU count from `ray.nodes()`, and its GPU
memory from `nvidia-smi` run there by a zero-resource task (Ray reports GPU counts, not memory).
CPU-only jobs, and clusters whose GPU memory cannot be read, skip the memory check with a log line.
The cluster is taken as it is when the job starts: an autoscaling cluster that adds GPU nodes on
demand needs `rayrlhf train --skip-capacity-check` (and `rayrlhf plan` against its full size).
"""

from __future__ import annotations

import logging
import subprocess

from rayrlhf.config import JobConfig
from rayrlhf.errors import InvalidInput

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 60.0


def _gpu_memory_gib() -> float | None:
    """The smallest GPU's memory on this node, GiB (None without nvidia-smi)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        values = [float(v) for v in out.split()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return min(values) / 1024 if values else None


def probe_gpu_memory(nodes: list[dict]) -> dict[str, float]:
    """{NodeID: GiB} for the alive GPU nodes whose memory could be read."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(_gpu_memory_gib)
    ids = [n["NodeID"] for n in nodes if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0]
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(i, soft=False)).remote() for i in ids]
    try:
        values = ray.get(refs, timeout=PROBE_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - a probe that cannot run leaves the memory unknown
        log.warning("could not read the GPU memory of the nodes (%s)", exc)
        return {}
    return {i: v for i, v in zip(ids, values, strict=True) if v is not None}


def check_cluster_capacity(cfg: JobConfig) -> None:
    """Warn about CPU-valued keys on a GPU cluster; raise InvalidInput (exit 2) when the job does not fit it."""
    import ray

    from rayrlhf.orchestrator.capacity_plan import (
        check_capacity,
        cluster_from_nodes,
        cpu_valued_warnings,
        smallest_fix,
    )
    from rayrlhf.orchestrator.plan import plan_actors

    for warning in cpu_valued_warnings(cfg, ray.cluster_resources()):
        log.warning("%s", warning)
    if plan_actors(cfg).total_gpus == 0:
        return  # a CPU job: nothing for the GPU planner to check
    nodes = ray.nodes()
    memory = probe_gpu_memory(nodes)
    gpu_nodes = [n for n in nodes if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0]
    if not gpu_nodes:
        raise InvalidInput("the job asks for GPUs (rollout/trainer/servers num_gpus) but the Ray cluster has none "
                           "(an autoscaling cluster that adds GPU nodes on demand: --skip-capacity-check)")
    if len(memory) < len(gpu_nodes):
        log.warning("GPU memory unknown on %d node(s): skipping the capacity check (run `rayrlhf plan` with "
                    "--cluster to check the plan by hand)", len(gpu_nodes) - len(memory))
        return
    cluster = cluster_from_nodes(nodes, memory)
    shapes: dict = {}
    report = check_capacity(cfg, cluster, shapes)
    log.info("capacity plan:\n%s", report.table())
    if not report.fits:
        fix = smallest_fix(cfg, cluster, report, shapes)
        raise InvalidInput("this job does not fit the cluster:\n  " + "\n  ".join(report.problems)
                           + (f"\nsmallest change that fits: {fix.describe()}" if fix else "")
                           + "\n(the figures are estimates, and the cluster is read as it is now: on an autoscaling "
                           "cluster, or to start anyway, --skip-capacity-check)")

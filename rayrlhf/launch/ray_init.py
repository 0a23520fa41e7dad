"""Connect to the Ray cluster named by config or RAY_ADDRESS, or start an embedded local Ray.

Ray's token authentication stays on (the Ray 2.60 default) and the embedded dashboard binds
to localhost unless the config says otherwise.
"""

from __future__ import annotations

import logging
import os

from rayrlhf.config import JobConfig

log = logging.getLogger(__name__)


def logical_cpus_needed(cfg: JobConfig) -> float:
    """CPUs the job's actors reserve, so an embedded Ray on a 2-core laptop still schedules them all."""
    if cfg.algorithm.is_online:
        from rayrlhf.orchestrator.plan import plan_actors

        total = plan_actors(cfg).total_cpus
    else:
        total = cfg.trainer.policy.num_ranks * cfg.trainer.policy.num_cpus + cfg.servers.reference_num_cpus
    return total + 1  # room for the driver's own tasks


def connect(cfg: JobConfig) -> str:
    """Initialise Ray for this job; returns 'cluster' or 'embedded'."""
    import ray

    if ray.is_initialized():
        return "cluster"
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return "cluster"
    num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, int(logical_cpus_needed(cfg) + 0.999))
    log.info("starting an embedded local Ray (%d logical CPUs)", num_cpus)
    ray.init(
        address="local",  # always a new instance: a bare ray.init() would join a `ray start` cluster on this machine
        num_cpus=num_cpus,
        include_dashboard=cfg.ray.include_dashboard,
        dashboard_host=cfg.ray.dashboard_host,
        log_to_driver=True,
    )
    return "embedded"

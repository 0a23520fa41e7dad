"""Run one job: connect to Ray, pick the loop by `algorithm.name`, and shut down cleanly."""

from __future__ import annotations

import logging
from pathlib import Path

from rayrlhf.config import JobConfig
from rayrlhf.launch.ray_init import connect

log = logging.getLogger(__name__)


def run_job(cfg: JobConfig, resume: bool = False, capacity_check: bool = True) -> Path:
    """Run `cfg` to completion and return the folder of the final model; an online job that asks for GPUs is
    first checked against the cluster's GPUs and their memory (`capacity_check`)."""
    import ray

    from rayrlhf.config.paths import anchor_paths
    from rayrlhf.orchestrator.run_dir import claim_output_dir

    anchor_paths(cfg)  # actors do not share this working directory (a `ray start` cluster runs them elsewhere)
    claim_output_dir(cfg.output_dir, resume)  # before anything is written: never over another run's files
    offline = checked = None
    if not cfg.algorithm.is_online:
        from rayrlhf.orchestrator.offline import OfflineTrainer

        offline = OfflineTrainer(cfg, resume=resume)  # reads and checks the data before Ray starts
    else:
        from rayrlhf.orchestrator.preflight import preflight

        checked = preflight(cfg)  # plan, models, data, reward function: a job that cannot run stops here
        log.info("actor plan:\n%s", checked.plan.describe())
    mode = connect(cfg)
    try:
        if offline is not None:
            try:
                return offline.run()
            finally:
                offline.shutdown()
        from rayrlhf.orchestrator.online import OnlineRL

        if capacity_check:
            from rayrlhf.launch.capacity_check import check_cluster_capacity

            check_cluster_capacity(cfg)  # before any actor starts: exit 2 naming what does not fit
        job = OnlineRL(cfg, resume=resume, checked=checked)
        try:
            return job.run()
        finally:
            job.system.shutdown()
    finally:
        if mode == "embedded":
            ray.shutdown()

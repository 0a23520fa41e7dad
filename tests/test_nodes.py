"""Node loss on a real multi-node Ray cluster: a head and two worker nodes on this machine (each `ray start` in
a session of its own), rollout workers and trainer ranks spread over the worker nodes as the config asks
(`rollout.placement: spread`, `trainer.policy.placement: spread`), and one worker node killed in the middle of
the job. The rollout worker and the trainer rank that lived there are gone with it: the worker restarts on the
surviving node and serves again, the trainer groups are rebuilt there from the checkpoint, and the job
finishes with every sample of every step trained once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from raycluster import ray_cluster, stop_session

from rayrlhf.orchestrator.metrics import read_metrics
from rayrlhf.orchestrator.samples import read_samples

ROOT = Path(__file__).resolve().parents[1]
RAYRLHF = str(Path(sys.executable).parent / "rayrlhf")
# Node death is noticed within ~3 s instead of Ray's default ~30 s (health checks every second, 3 misses).
FAST_HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
               "RAY_health_check_initial_delay_ms": "1000"}


def _state(head, resource: str) -> list:
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    client = StateApiClient(head.dashboard, headers={**head.auth, "Content-Type": "application/json"})
    return client.list(getattr(StateResource, resource), options=ListApiOptions(limit=1000, detail=True),
                       raise_on_missing_output=False)


def _node_names(head) -> dict[str, str]:
    """{node id: "node_a" | "node_b" | "head"} of the live nodes, by the custom resource each was started with."""
    names = {}
    for node in _state(head, "NODES"):
        if node.state == "ALIVE":
            total = node.resources_total or {}
            names[node.node_id] = "node_a" if "node_a" in total else "node_b" if "node_b" in total else "head"
    return names


def _join(head, name: str, attempts: int = 3) -> subprocess.Popen:
    """Start worker node `name` and wait until it is alive. One at a time, and again when `ray start` gives up:
    on a loaded 2-core machine a raylet can miss `ray start`'s fixed 30 s registration window."""
    for _ in range(attempts):
        node = head.add_node(num_cpus=6, resources=f'{{"{name}": 1}}')
        deadline = time.monotonic() + 120
        while node.poll() is None and time.monotonic() < deadline:
            if name in _node_names(head).values():
                return node
            time.sleep(1)
        stop_session(node, kill=True)
    raise AssertionError(f"worker node {name} did not join in {attempts} attempts: {head.temp_dir}")


@pytest.mark.slow
def test_losing_a_node_mid_job_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    steps, prompts, group = 8, 8, 4
    reward = tmp_path / "slow_reward.py"  # ~1 s per step, so the node is lost mid-job
    reward.write_text("import time\nfrom rayrlhf.rewards.tasks import sort_reward\n\n"
                      "def reward(prompts, responses, answer, **_):\n    time.sleep(0.5)\n"
                      "    return sort_reward(prompts, responses, answer)\n")
    with ray_cluster(tmp_path, head_cpus=0, env_extra=FAST_HEALTH) as head:
        nodes = {name: _join(head, name) for name in ("node_a", "node_b")}
        # paths relative to the job's directory (ROOT), which the nodes' actors do not share: the driver anchors them
        relative = {p: os.path.relpath(p, ROOT) for p in (out, reward)}
        cmd = [RAYRLHF, "train", str(ROOT / "cluster_configs/local-cpu/grpo.yaml"), "--address", head.gcs,
               *[a for o in (f"output_dir={relative[out]}", "rollout.backend=hf", "rollout.num_workers=2", "rollout.placement=spread",
                             "rollout.num_cpus=1", "trainer.policy.num_ranks=2", "trainer.policy.placement=spread",
                             f"schedule.steps={steps}", f"schedule.prompts_per_step={prompts}",
                             f"algorithm.group_size={group}", "checkpoint.every=2", "rollout.dump_every=1", "data.eval=null",
                             f"reward.function={relative[reward]}:reward", "rollout.micro_batch_size=32",
                             "faults.restart_timeout_s=120")
                 for a in ("--set", o)]]
        env = {**head.env, "RAY_AUTH_MODE": "token"}
        job = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            metrics = out / "metrics.jsonl"
            while not (metrics.is_file() and len(read_metrics(metrics)) >= 3):
                assert job.poll() is None, job.stdout.read()[-5000:]
                time.sleep(0.5)
            names = _node_names(head)
            where = {a.name: names.get(a.node_id) for a in _state(head, "ACTORS") if a.name and a.state == "ALIVE"}
            # spread as the config asks: one rollout worker and one policy rank on each worker node
            assert {where["rollout-0"], where["rollout-1"]} == {where["policy-0"], where["policy-1"]} == {"node_a", "node_b"}
            stop_session(nodes["node_b"], kill=True)  # the node is lost: its raylet and every process on it, at once
            output, _ = job.communicate(timeout=900)
        finally:
            if job.poll() is None:
                job.kill()
        (tmp_path / "job.log").write_text(output)  # kept for a failure below
        assert job.returncode == 0, output[-6000:]
    rows = read_metrics(metrics)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    last = rows[-1]
    assert last["faults/worker_failures"] >= 1 and last["faults/worker_restarts"] >= 1 and last["faults/trainer_restarts"] == 1
    for step in range(1, steps + 1):  # every prompt of every step, each of its samples once
        pairs = Counter((s["row"], s["sample_index"]) for s in read_samples(out / "samples" / f"step_{step}.jsonl"))
        assert len(pairs) == prompts * group and set(pairs.values()) == {1}, step
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{steps}"

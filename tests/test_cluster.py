"""Running on a Ray cluster: `rayrlhf submit` through the Jobs API, token auth, named actors,
Prometheus metrics, and independent scaling of rollout workers and trainer ranks.

The cluster tests start their own Ray head (`ray start --head --block`) on free ports with a
private --temp-dir and token authentication on, so they never touch another Ray instance on
this machine: the head is stopped by signalling the processes of its own session, never with
`ray stop` (which stops every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from raycluster import Head, http_get, ray_cluster

from rayrlhf.config import load_config
from rayrlhf.launch.submit import STAGE_DIR, auth_headers, entrypoint, find_auth_token
from rayrlhf.orchestrator.telemetry import metric_names

ROOT = Path(__file__).resolve().parents[1]
GRPO = ROOT / "cluster_configs" / "local-cpu" / "grpo.yaml"
BIN = Path(sys.executable).parent
RAYRLHF = str(BIN / "rayrlhf")


@pytest.fixture(scope="class")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    """A real single-node Ray cluster with token auth, started and stopped by this fixture only."""
    with ray_cluster(tmp_path_factory.mktemp("auth")) as head:
        yield head


class MetricsScraper(threading.Thread):
    """Scrapes the node's Prometheus endpoint every 0.5 s and keeps the last value of each rayrlhf series."""

    LINE = re.compile(r"^(ray_rayrlhf_\w+)(\{[^}]*\})?\s+(\S+)$")

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.seen: dict[str, float] = {}  # name -> max value seen
        self.labels: dict[str, str] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                _, text = http_get(self.url, timeout=3)
                for line in text.splitlines():
                    m = self.LINE.match(line)
                    if m:
                        name, labels, value = m.groups()
                        self.seen[name] = max(self.seen.get(name, float("-inf")), float(value))
                        self.labels[name] = labels or ""
            except OSError:
                pass
            self.stop.wait(0.5)


GPU_2X8 = ROOT / "cluster_configs" / "gpu-2x8"


def test_cluster_manifests_keep_token_auth_and_run_a_shipped_config() -> None:
    import yaml

    job = yaml.safe_load((GPU_2X8 / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and "algorithm" not in job
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["rayrlhf", "train"]
    load_config(ROOT / entry[2].removeprefix("/home/ray/rayrlhf/"))  # the image's copy of a shipped config
    spec = job["spec"]["rayClusterSpec"]
    containers = [spec["headGroupSpec"]["template"]["spec"]["containers"][0]]
    containers += [g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]]
    containers += job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    for c in containers:
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in c["env"], c["name"]
    assert sum(g["replicas"] for g in spec["workerGroupSpecs"]) + 1 == 2
    launcher = yaml.safe_load((GPU_2X8 / "cluster.yaml").read_text())
    assert "algorithm" not in launcher and launcher["provider"]["type"] in ("aws", "gcp")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(launcher[key])
        assert "RAY_AUTH_MODE=token ray start" in start and "--metrics-export-port=8080" in start


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_submit_rejects_an_invalid_config_before_contacting_a_cluster() -> None:
    proc = _run(
        [RAYRLHF, "submit", str(GRPO), "--address", "http://127.0.0.1:9", "--set", "rollout.num_worker=2"], dict(os.environ), 60
    )
    assert proc.returncode == 2, proc.stderr
    assert "rollout.num_worker: unknown key (did you mean 'num_workers'?)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_address_means_the_ray_cluster_and_submit_takes_the_dashboard(capsys: pytest.CaptureFixture) -> None:
    """`--address` is the Ray cluster address (train); submit's dashboard URL is `--dashboard`. A Ray address given
    to submit as --address is refused naming both, before anything is sent."""
    from rayrlhf.launch.cli import main

    assert main(["submit", str(GRPO), "--address", "10.0.0.1:6379"]) == 2
    err = capsys.readouterr().err
    assert "--dashboard http://HEAD:8265" in err and "Ray cluster address of rayrlhf train" in err


def test_entrypoint_runs_rayrlhf_without_it_on_path_or_says_what_to_do() -> None:
    """The job supervisor (a Python process with Ray loaded) runs the entrypoint with /bin/sh -c."""
    import ray  # noqa: F401 - this process stands in for the supervisor: its memory map names ray's site-packages

    ep = entrypoint(["validate", str(GRPO), "--set", "schedule.steps=3"])
    bare = {"PATH": "/usr/bin:/bin"}  # no virtualenv on PATH, no rayrlhf command
    found = subprocess.run(ep, shell=True, env=bare, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert found.returncode == 0 and "steps: 3" in found.stdout, found.stderr[-2000:]
    # Run from a plain shell instead (no Ray loaded in the parent): no interpreter that can run rayrlhf.
    lost = subprocess.run(["/bin/sh", "-c", 'sh -c "$0"', ep], env=bare, capture_output=True, text=True, timeout=120, cwd="/")
    assert lost.returncode == 127 and "the cluster cannot run rayrlhf" in lost.stderr and "ray start" in lost.stderr


def test_token_lookup_follows_rays_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tok"
    path.write_text("from-file\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    assert find_auth_token() == "from-file"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth_headers() == {"Authorization": "Bearer from-env"}


@pytest.mark.slow
class TestCluster:
    def test_auth_is_on_and_a_wrong_token_is_refused(self, ray_head: Head) -> None:
        assert http_get(f"{ray_head.dashboard}/api/jobs/")[0] == 401  # no token: refused
        proc = _run(
            [RAYRLHF, "submit", str(GRPO), "--dashboard", ray_head.dashboard, "--no-working-dir"],
            {**ray_head.env, "RAY_AUTH_TOKEN": "not-the-token"}, 120,
        )
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "refused the auth token" in proc.stderr and "Traceback" not in proc.stderr

    def test_ray_job_submit_needs_rayrlhf_on_the_heads_path(self, ray_head: Head) -> None:
        """Ray's own `ray job submit -- rayrlhf ...` runs the command as typed (it needs RAY_AUTH_MODE=token to send the
        token): on this head, whose PATH lacks the virtualenv, the shell cannot find it (`rayrlhf submit` can, below)."""
        env = {**ray_head.env, "RAY_AUTH_MODE": "token", "RAY_API_SERVER_ADDRESS": ray_head.dashboard}
        proc = _run(
            [str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--", "rayrlhf", "validate", str(GRPO.relative_to(ROOT)),
             "--set", "schedule.steps=3"], env, 240,
        )
        assert proc.returncode != 0 and "rayrlhf: not found" in proc.stdout + proc.stderr, proc.stdout[-3000:]

    def test_submit_follow_runs_a_grpo_job(self, ray_head: Head, tmp_path: Path) -> None:
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        out = tmp_path / "run"
        job_id = f"rayrlhf-test-{secrets.token_hex(4)}"
        scraper = MetricsScraper(ray_head.metrics_url)
        scraper.start()
        try:
            proc = _run(
                [RAYRLHF, "submit", str(GRPO), "--dashboard", ray_head.dashboard, "--follow", "--submission-id", job_id,
                 "--set", "schedule.steps=6", "--set", "rollout.backend=hf", "--set", "rollout.num_workers=2",
                 "--set", "trainer.policy.num_ranks=1", "--set", f"output_dir={out}",
                 "--set", "checkpoint.every=0", "--set", "logging.in_flight_poll_s=0.5"],
                ray_head.env, 600,
            )
        finally:
            # Counters outlive the driver; give its last export (every second here) a moment to land.
            deadline = time.monotonic() + 10
            while scraper.seen.get("ray_rayrlhf_steps_total", 0) < 6 and time.monotonic() < deadline:
                time.sleep(0.5)
            scraper.stop.set()
            scraper.join()
        assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
        assert f"submitted job {job_id}" in proc.stdout
        assert f"{ray_head.dashboard}/#/jobs/{job_id}" in proc.stdout
        assert "step 6/6" in proc.stdout  # the job's own log, streamed
        assert f"job {job_id}: SUCCEEDED" in proc.stdout  # with no rayrlhf on the head's PATH (see ray_head)
        assert not (ROOT / STAGE_DIR).exists(), "the staged config must be removed after the upload"

        # The job ran the resolved config and wrote its outputs.
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]  # step 0: the evaluation before training
        assert "eval/reward_mean" in rows[0] and "eval/reward_mean" in rows[-1]
        assert load_config(out / "config.yaml").schedule.steps == 6
        assert (out / "final" / "config.json").exists()

        # The actors read like the system diagram in the dashboard's actor list, and their counts
        # follow the config: 2 rollout workers, 1 policy rank (the opposite split is tested below).
        client = StateApiClient(ray_head.dashboard, headers={**ray_head.auth, "Content-Type": "application/json"})
        actors = client.list(StateResource.ACTORS, options=ListApiOptions(limit=1000, detail=True), raise_on_missing_output=False)
        names = {a.name: a.class_name for a in actors if a.name}
        assert {n: c for n, c in names.items() if n.startswith(("rollout-", "policy-", "critic-"))} == {
            "rollout-0": "RolloutWorker", "rollout-1": "RolloutWorker", "policy-0": "TrainerRank",
        }
        assert names.get("reference") == "ReferenceServer" and names.get("reward-0") == "RewardServer"

        # The project's metrics reached the node's Prometheus endpoint while the job ran.
        expected = {
            "ray_rayrlhf_step", "ray_rayrlhf_weight_version", "ray_rayrlhf_reward_mean", "ray_rayrlhf_kl_mean",
            "ray_rayrlhf_throughput_tokens_per_s", "ray_rayrlhf_phase_seconds", "ray_rayrlhf_rollout_in_flight",
            "ray_rayrlhf_steps_total", "ray_rayrlhf_samples_total",
        }
        missing = expected - set(scraper.seen)
        assert not missing, f"not scraped: {sorted(missing)}; seen: {sorted(scraper.seen)}"
        assert {f"ray_{n}" for n in metric_names()} >= expected - {"ray_rayrlhf_steps_total", "ray_rayrlhf_samples_total"}
        assert scraper.seen["ray_rayrlhf_step"] >= 1 and scraper.seen["ray_rayrlhf_weight_version"] >= 1
        assert scraper.seen["ray_rayrlhf_steps_total"] == 6
        assert 'algorithm="grpo"' in scraper.labels["ray_rayrlhf_step"] and 'run="run"' in scraper.labels["ray_rayrlhf_step"]


@pytest.mark.slow
def test_rollout_workers_and_trainer_ranks_scale_independently(ray_local: None, tmp_path: Path) -> None:
    """1 rollout worker and 2 policy ranks here; the cluster job above runs the opposite split (2 and 1)."""
    import ray

    workers, ranks = 1, 2

    from rayrlhf.orchestrator.preflight import preflight
    from rayrlhf.orchestrator.system import System

    cfg = load_config(GRPO, [
        f"rollout.num_workers={workers}", f"trainer.policy.num_ranks={ranks}", "rollout.backend=hf",
        f"output_dir={tmp_path}",
    ])
    ours = {f"rollout-{i}" for i in range(4)} | {f"policy-{i}" for i in range(4)} | {"reference", "reward-0"}
    system = System(cfg, preflight(cfg))
    try:
        alive = set(ray.util.list_named_actors()) & ours
        assert alive == {f"rollout-{i}" for i in range(workers)} | {f"policy-{i}" for i in range(ranks)} | {"reference", "reward-0"}
        assert len(system.rollout_workers) == workers and system.policy.num_ranks == ranks
    finally:
        system.shutdown()
    deadline = time.monotonic() + 60  # the names are released once the actors are gone
    while set(ray.util.list_named_actors()) & ours and time.monotonic() < deadline:
        time.sleep(0.5)


@pytest.mark.parametrize(("override", "package"), [("logging.tensorboard=true", "tensorboard"), ("logging.wandb_project=demo", "wandb")])
def test_optional_loggers_fail_fast_naming_the_key(
    tmp_path: Path, override: str, package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rayrlhf.config import ConfigError
    from rayrlhf.orchestrator.telemetry import Telemetry

    # Make the optional package unimportable whether or not it is installed, so the check always runs.
    for name in (package, "torch.utils.tensorboard") if package == "tensorboard" else (package,):
        monkeypatch.setitem(sys.modules, name, None)
    cfg = load_config(GRPO, [override, "logging.ray_metrics=false", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=rf"logging\.\w+.*needs the '{package}' package"):
        Telemetry(cfg)


def test_telemetry_records_a_row_without_errors(ray_local: None, tmp_path: Path) -> None:
    from rayrlhf.orchestrator.telemetry import Telemetry

    telemetry = Telemetry(load_config(GRPO, [f"output_dir={tmp_path / 'tele'}"]))
    row = {"step": 1, "weight_version": 1, "reward/mean": 0.5, "kl/mean": float("nan"), "timing/step_s": 1.0,
           "rollout/backend": "hf", "policy/clipfrac": 0.1, "reward/failed": 2}
    telemetry.record(row, in_flight={"rollout-0": 3})
    telemetry.close()
    assert telemetry.ray is not None and not telemetry._failed
    assert telemetry.run_name == "tele"


def _wait_rows(path: Path, n: int, timeout_s: float = 400) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.is_file() and sum(1 for line in path.read_text().splitlines() if '"step": 0' not in line) >= n):
        assert time.monotonic() < deadline, f"{path} did not reach {n} rows"
        time.sleep(0.5)


@pytest.mark.slow
def test_ray_job_stop_checkpoints_and_submit_resume_continues_exactly(tmp_path: Path) -> None:
    """`ray job stop` gives the job RAY_JOB_STOP_WAIT_TIME_S to finish its step and checkpoint (rayrlhf submit sets it:
    Ray's default, 3 s, is shorter than a step), and `rayrlhf submit --resume` continues it; the stopped-and-resumed
    run equals one that ran straight through."""
    slow = tmp_path / "slow_reward.py"  # a step of ~1.5 s, so the stop lands mid-run
    slow.write_text("import time\nfrom rayrlhf.rewards.tasks import sort_reward\n\n"
                    "def reward(prompts, responses, answer, **_):\n    time.sleep(1.5)\n"
                    "    return sort_reward(prompts, responses, answer)\n")
    job = ["--set", "schedule.steps=6", "--set", "rollout.backend=hf", "--set", "checkpoint.every=0", "--set",
           "data.eval=null", "--set", f"reward.function={slow}:reward", "--set", "rollout.micro_batch_size=64"]
    with ray_cluster(tmp_path) as head:
        def submit(out: Path, *extra: str) -> subprocess.CompletedProcess:
            return _run([RAYRLHF, "submit", str(GRPO), "--dashboard", head.dashboard, *job, "--set", f"output_dir={out}",
                         *extra], head.env, 600)

        straight = submit(tmp_path / "straight", "--follow")
        assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-2000:]
        started = submit(tmp_path / "stopped")
        assert started.returncode == 0, started.stderr[-2000:]
        job_id = re.search(r"submitted job (\S+)", started.stdout).group(1)
        _wait_rows(tmp_path / "stopped" / "metrics.jsonl", 2)
        env = {**head.env, "RAY_AUTH_MODE": "token", "RAY_API_SERVER_ADDRESS": head.dashboard}
        stop = _run([str(BIN / "ray"), "job", "stop", job_id], env, 600)
        assert stop.returncode == 0 and "stopped" in (stop.stdout + stop.stderr).lower(), stop.stdout + stop.stderr
        logs = _run([str(BIN / "ray"), "job", "logs", job_id], env, 120).stdout
        assert "stopped on SIGTERM after step" in logs, logs[-3000:]
        stopped_at = int((tmp_path / "stopped" / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
        assert 2 <= stopped_at < 6
        resumed = submit(tmp_path / "stopped", "--resume", "--follow")
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]
        assert "--resume" in resumed.stdout
    a = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [r["step"] for r in a] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b, strict=True):
        for key in ("reward/mean", "kl/mean", "response/length_mean", "policy/loss", "data/epoch"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["step"], key)

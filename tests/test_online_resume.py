"""Resume equality: 4 steps straight versus 2, stop, `--resume`, 2 more, on 2 rollout workers and a
2-rank ZeRO-3 policy, while a reward function that fails on some samples is counted in
`reward/failed` and never stops the job. The straight run also evaluates on data.eval (before the
first step, every 2 steps, at the end) and the resumed one does not: their training figures
must still be equal, step by step, so evaluation leaves the training run untouched."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from jobs import ROOT, train

from rayrlhf.config import load_config
from rayrlhf.orchestrator.metrics import read_metrics

FLAKY_REWARD = '''
from rayrlhf.rewards.tasks import sort_reward

def reward(prompts, responses, answer, **_):
    if any("q" in r for r in responses):
        raise ValueError("this batch has a q")  # the batch fails, then each sample is retried alone
    return sort_reward(prompts, responses, answer)
'''


@pytest.fixture
def flaky_reward(tmp_path: Path) -> Path:
    path = tmp_path / "flaky_reward.py"
    path.write_text(FLAKY_REWARD)
    return path


def test_resume_reproduces_the_run_with_two_workers_zero3_and_failing_rewards(
    ray_local: None, tmp_path: Path, flaky_reward: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rayrlhf.orchestrator.system")
    common = (
        f"reward.function={flaky_reward}:reward", "rollout.backend=vllm", "rollout.num_workers=2", "rollout.num_cpus=0.5",
        "trainer.policy.num_ranks=2", "trainer.zero_stage=3", "trainer.micro_batch_size=4",
        "schedule.prompts_per_step=8", "algorithm.group_size=4", "checkpoint.every=2", "rollout.micro_batch_size=4",
    )
    with_eval = ("schedule.eval_every=2", "schedule.eval_max_prompts=8", "schedule.eval_decoding=both")
    rows = train("cluster_configs/local-cpu/grpo.yaml", tmp_path, "straight", "schedule.steps=4", *common, *with_eval)
    # the interrupted run also puts the reference beside policy-0 (servers.colocate): no figure may change
    colocated = ("data.eval=null", "servers.colocate=true")
    train("cluster_configs/local-cpu/grpo.yaml", tmp_path, "resumed", "schedule.steps=2", *common, *colocated)
    assert (tmp_path / "resumed/checkpoints/latest").read_text().strip() == "step_2"
    resumed = train("cluster_configs/local-cpu/grpo.yaml", tmp_path, "resumed", "schedule.steps=4", *common,
                    *colocated, resume=True)
    _assert_reference_in_policy_0s_bundle(caplog.text)

    evals = [r for r in rows if "eval/reward_mean" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for key in ("eval/greedy/reward_mean", "eval/sampled/reward_mean", "eval/response_length_mean", "eval/failed_frac"):
        assert key in evals[-1], key
    assert evals[-1]["eval/samples"] == 8 and evals[-1]["eval/reward_mean"] == evals[-1]["eval/greedy/reward_mean"]
    straight = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert not any(k.startswith("eval/") for r in resumed for k in r)
    for a, b in zip(straight, resumed, strict=True):
        assert a["data/epoch"] == b["data/epoch"]
        for key in ("reward/mean", "kl/mean", "response/length_mean", "reward/failed", "policy/loss",
                    "rollout/logprob_mismatch", "policy/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    failed = sum(r["reward/failed"] for r in straight)
    assert 0 < failed < 4 * 32  # some samples were unscorable, and they were counted, not fatal
    assert straight[-1]["weight_version"] == 4


def _assert_reference_in_policy_0s_bundle(logged: str) -> None:
    """The job asked its reference which placement group it runs in (servers.colocate): the policy's, whose first
    bundle has room for policy-0 and the reference; on GPUs the two would share policy-0's GPU."""
    import ray

    cfg = load_config(ROOT / "cluster_configs/local-cpu/grpo.yaml")
    rank, server = cfg.trainer.policy.num_cpus, cfg.servers.reference_num_cpus
    found = re.findall(r"servers.colocate: reference beside policy-0 in the policy's placement group (\w+)", logged)
    assert len(found) == 2  # the first run and the resumed one
    for pg in found:
        bundles = ray.util.placement_group_table()[pg]["bundles"]
        assert [bundles[i].get("CPU") for i in sorted(bundles)] == [rank + server, rank]


def _start_job(config: str, out: Path, *overrides: str) -> subprocess.Popen:
    """`rayrlhf train` in its own process group: a second driver on the session's Ray (its actors die with it)."""
    import ray

    cmd = [str(Path(sys.executable).parent / "rayrlhf"), "train", str(ROOT / config), "--set", f"output_dir={out}",
           *[a for o in overrides for a in ("--set", o)]]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(proc: subprocess.Popen, done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 600
    while not done():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before {what}:\n{proc.stdout.read()[-5000:]}")
        assert time.monotonic() < deadline, f"no {what} within 600 s"
        time.sleep(0.05)


def _checkpointed(out: Path, step: int) -> Callable[[], bool]:
    latest = out / "checkpoints" / "latest"
    return lambda: latest.is_file() and latest.read_text().strip() == f"step_{step}"


ASYNC = ("model.policy=tiny:qwen2", "schedule.max_staleness=2", "schedule.steps=5", "checkpoint.every=2", "rollout.num_workers=2",
         "rollout.num_cpus=0.5", "schedule.prompts_per_step=4", "algorithm.group_size=4", "data.eval=null",
         "rollout.micro_batch_size=4")
COMPARED = ("reward/mean", "kl/mean", "response/length_mean", "policy/loss", "policy/grad_norm",
            "policy/is_weight_mean", "rollout/staleness_mean", "data/epoch")


def test_async_resume_after_a_kill_or_a_sigterm_reproduces_the_run(ray_local: None, tmp_path: Path) -> None:
    """max_staleness=2, on the tied Qwen2. Killed (SIGKILL to the process group, mid-step) after the step-2 checkpoint, which holds
    the rollouts of steps 3 and 4, generated by older weights than the ones resumed; or stopped by SIGTERM, which
    ends the job at the next step boundary with a checkpoint and exit status 75. Resumed, both equal the straight run."""
    straight = train("cluster_configs/local-cpu/grpo.yaml", tmp_path, "straight", *ASYNC)

    killed = _start_job("cluster_configs/local-cpu/grpo.yaml", tmp_path / "killed", *ASYNC)
    try:
        _wait_for(killed, _checkpointed(tmp_path / "killed", 2), "its step-2 checkpoint")
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
    saved = torch.load(tmp_path / "killed/checkpoints/step_2/rollouts.pt", weights_only=True)
    assert sorted(saved) == [3, 4]  # the buffered steps, whole

    stopped = _start_job("cluster_configs/local-cpu/grpo.yaml", tmp_path / "stopped", *ASYNC)
    metrics = tmp_path / "stopped/metrics.jsonl"
    _wait_for(stopped, lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 1, "its first step")
    stopped.send_signal(signal.SIGTERM)  # to the driver only, as `ray job stop` or a pod eviction does first
    output = stopped.communicate(timeout=300)[0]
    assert stopped.returncode == 75, output[-3000:]
    assert "continue with --resume" in output
    last = read_metrics(metrics)[-1]["step"]
    assert 1 <= last < 5 and (tmp_path / "stopped/checkpoints/latest").read_text().strip() == f"step_{last}"

    for name in ("killed", "stopped"):
        resumed = train("cluster_configs/local-cpu/grpo.yaml", tmp_path, name, *ASYNC, resume=True)
        assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
        for a, b in zip(straight, resumed, strict=True):
            for key in COMPARED:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (name, a["step"], key)
    # Steps 1-3 train on samples of the first weights (launched together), then two versions behind.
    assert [r["rollout/staleness_max"] for r in straight] == [0, 1, 2, 2, 2]
    assert [r["rollout/min_weight_version"] for r in straight] == [0, 0, 0, 1, 2]
    assert all(0 < r["policy/is_weight_mean"] <= 2.0 for r in straight)  # truncated at algorithm.importance_cap

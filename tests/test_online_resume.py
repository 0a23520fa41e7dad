"""Resume equality: 4 steps straight versus 2, stop, `--resume`, 2 more, on 2 rollout workers and a
2-rank ZeRO-3 policy, while a reward function that fails on some samples is counted in
`reward/failed` and never stops the job. The straight run also evaluates on data.eval (before the
first step, every 2 steps, at the end) and the resumed one does not: their training figures
must still be equal, step by step, so evaluation leaves the training run untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
from jobs import train

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
    ray_local: None, tmp_path: Path, flaky_reward: Path
) -> None:
    common = (
        f"reward.function={flaky_reward}:reward", "rollout.num_workers=2", "rollout.num_cpus=0.5",
        "trainer.policy.num_ranks=2", "trainer.zero_stage=3", "trainer.micro_batch_size=4",
        "schedule.prompts_per_step=8", "algorithm.group_size=4", "checkpoint.every=2", "rollout.micro_batch_size=4",
    )
    with_eval = ("schedule.eval_every=2", "schedule.eval_max_prompts=8", "schedule.eval_decoding=both")
    rows = train("cluster_configs/local-cpu/grpo.yaml", tmp_path, "straight", "schedule.steps=4", *common, *with_eval)
    train("cluster_configs/local-cpu/grpo.yaml", tmp_path, "resumed", "schedule.steps=2", *common, "data.eval=null")
    assert (tmp_path / "resumed/checkpoints/latest").read_text().strip() == "step_2"
    resumed = train("cluster_configs/local-cpu/grpo.yaml", tmp_path, "resumed", "schedule.steps=4", *common,
                    "data.eval=null", resume=True)

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

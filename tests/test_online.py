"""`rayrlhf train` end to end on CPU: real Ray, vLLM and DeepSpeed on the tiny model.

- GRPO and PPO raise the mean reward on the `sort` task, with a clear margin;
- (tests/test_online_resume.py) resume equality on 2 rollout workers and a ZeRO-3 policy.
"""

from __future__ import annotations

from pathlib import Path

from jobs import mean, train
from transformers import AutoModelForCausalLM

from rayrlhf.config import load_config

REQUIRED = ("step", "weight_version", "reward/mean", "kl/mean", "response/length_mean", "rollout/backend",
            "timing/step_s", "timing/rollout_s", "timing/train_s", "timing/sync_s", "policy/clipfrac",
            "policy/entropy", "kl/coef", "reward/failed", "throughput/tokens_per_s", "timing/score_s",
            "timing/overlap_frac")

def test_grpo_raises_the_reward(ray_local: None, tmp_path: Path) -> None:
    rows = train("cluster_configs/local-cpu/grpo.yaml", tmp_path, "grpo", "schedule.steps=40", "checkpoint.every=0")
    assert [r["step"] for r in rows] == list(range(1, 41))
    for key in REQUIRED:
        assert key in rows[-1], key
    first, last = mean(rows[:5], "reward/mean"), mean(rows[-5:], "reward/mean")
    print(f"grpo reward: first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert last > first + 0.04
    assert rows[-1]["weight_version"] == 40 and rows[-1]["rollout/min_weight_version"] == 39
    assert rows[-1]["rollout/backend"] == "vllm"
    final = tmp_path / "grpo" / "final"
    assert AutoModelForCausalLM.from_pretrained(final).config.num_hidden_layers == 2
    saved = load_config(tmp_path / "grpo" / "config.yaml")
    assert saved.schedule.steps == 40 and saved.algorithm.name == "grpo"


def test_ppo_raises_the_reward(ray_local: None, tmp_path: Path) -> None:
    rows = train("cluster_configs/local-cpu/ppo.yaml", tmp_path, "ppo", "schedule.steps=50", "checkpoint.every=0")
    first, last = mean(rows[:5], "reward/mean"), mean(rows[-5:], "reward/mean")
    print(f"ppo reward: first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert last > first + 0.04
    assert "critic/loss" in rows[-1] and "critic/explained_variance" in rows[-1]
    assert mean(rows[-5:], "critic/explained_variance") > mean(rows[:5], "critic/explained_variance")

"""`rayrlhf train` end to end on CPU: real Ray, vLLM and DeepSpeed on the tiny model.

- GRPO and PPO learn, with a wide margin, on a tied-embedding Qwen2 (the shape of Qwen2.5-0.5B)
  with the weight sync verified after every step. The reward is `alphabet_reward` (share of
  response characters in a-p): about 0.16 for the random model, near 1 after 30 steps (seen:
  0.16 -> 0.98 for both), so the bar below (+0.4) has a wide margin; the shipped configs' sort
  reward moves by a few hundredths from a random model, too little to test learning on;
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

LEARNABLE = ("model.policy=tiny:qwen2", "reward.function=rayrlhf.rewards.tasks:alphabet_reward",
             "schedule.verify_sync_every=1")


def test_grpo_raises_the_reward(ray_local: None, tmp_path: Path) -> None:
    rows = train("cluster_configs/local-cpu/grpo.yaml", tmp_path, "grpo", "schedule.steps=25", "checkpoint.every=0",
                 *LEARNABLE, "data.eval=null", "rollout.backend=vllm")  # ppo below takes `auto`: transformers generate
    assert [r["step"] for r in rows] == list(range(1, 26))
    assert max(r["rollout/logprob_mismatch"] for r in rows) < 1e-4  # engine and trainer: the same distribution
    for key in REQUIRED:
        assert key in rows[-1], key
    first, last = mean(rows[:5], "reward/mean"), mean(rows[-5:], "reward/mean")
    print(f"grpo reward: first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert last > first + 0.4
    assert rows[-1]["weight_version"] == 25 and rows[-1]["rollout/min_weight_version"] == 24
    assert rows[-1]["rollout/backend"] == "vllm"
    final = tmp_path / "grpo" / "final"
    exported = AutoModelForCausalLM.from_pretrained(final)
    assert exported.config.model_type == "qwen2" and exported.config.tie_word_embeddings
    saved = load_config(tmp_path / "grpo" / "config.yaml")
    assert saved.schedule.steps == 25 and saved.algorithm.name == "grpo"


def test_ppo_raises_the_reward(ray_local: None, tmp_path: Path) -> None:
    rows = train("cluster_configs/local-cpu/ppo.yaml", tmp_path, "ppo", "schedule.steps=25", "checkpoint.every=0",
                 *LEARNABLE, "model.critic=tiny:qwen2", "data.eval=null")
    first, last = mean(rows[:5], "reward/mean"), mean(rows[-5:], "reward/mean")
    print(f"ppo reward: first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert last > first + 0.4
    assert "critic/loss" in rows[-1] and "critic/explained_variance" in rows[-1]
    assert rows[-1]["rollout/backend"] == "hf"  # `auto` for a tiny model on CPU
    assert mean(rows[-5:], "critic/explained_variance") > mean(rows[:5], "critic/explained_variance")


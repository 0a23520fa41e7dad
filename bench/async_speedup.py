"""Asynchronous mode: samples per second at schedule.max_staleness k = 0, 1, 2, and the reward per sample.

Generation and training get different resources, as separate GPU pools would give them: the
rollout worker is pinned to core 0 and the policy trainer to core 1 (`rollout.cpus`,
`trainer.policy.cpus`), one thread each. The job is GRPO on the `alphabet_reward` task (learnable
from random weights) with a randomly initialised tied Qwen2 built locally (`--size`), 8 prompts x
8 samples x 24 new tokens per step, no KL. Each k runs the same number of steps, so the same
number of samples: the reward reached is compared at equal samples.

samples/s counts the samples of steps 2..N over the wall-clock time between the metrics rows of
step 1 and step N (start-up excluded, the same for every k).

    python bench/async_speedup.py            # ends with {"metric": "async_samples_per_s_k1_vs_k0", ...}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine, num_params, result

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # build_architecture("qwen2", ...) overrides
    "tiny": {},
    "small": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 768},
}
PROMPTS, SAMPLES, NEW_TOKENS = 8, 8, 24  # 24 tokens: generation and training take about as long


def run(model: Path, k: int, steps: int, lr: float, out: Path) -> list[dict]:
    overrides = [
        f"model.policy={model}", "data.eval=null", "algorithm.name=grpo", f"algorithm.group_size={SAMPLES}",
        "algorithm.kl_coef=0", f"schedule.prompts_per_step={PROMPTS}", f"schedule.steps={steps}",
        f"schedule.max_staleness={k}", f"rollout.max_new_tokens={NEW_TOKENS}", f"rollout.min_new_tokens={NEW_TOKENS}",
        "rollout.cpus=[0]", "rollout.num_threads=1", "trainer.policy.cpus=[1]", "trainer.policy.num_threads=1",
        f"trainer.policy.lr={lr}", "reward.function=rayrlhf.rewards.tasks:alphabet_reward", "checkpoint.every=0",
        f"output_dir={out}", "ray.include_dashboard=false",
    ]
    cmd = [str(Path(sys.executable).parent / "rayrlhf"), "train", str(ROOT / "cluster_configs/local-cpu/grpo.yaml")]
    with open(out.parent / f"k{k}.log", "w") as log_file:
        subprocess.run(cmd + [a for o in overrides for a in ("--set", o)], check=True, cwd=ROOT, stdout=log_file,
                       stderr=subprocess.STDOUT)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summary(rows: list[dict]) -> dict:
    samples = PROMPTS * SAMPLES * (len(rows) - 1)
    rewards = [r["reward/mean"] for r in rows]
    return {
        "samples_per_s": samples / (rows[-1]["time"] - rows[0]["time"]),
        "reward_first5": sum(rewards[:5]) / 5, "reward_last5": sum(rewards[-5:]) / 5,
        "staleness_max": max(r["rollout/staleness_max"] for r in rows),
        "wait_s": sum(r["timing/rollout_wait_s"] for r in rows[1:]) / (len(rows) - 1),
        "train_s": sum(r["timing/train_s"] for r in rows[1:]) / (len(rows) - 1),
        "rollout_s": sum(r["timing/rollout_s"] for r in rows[1:]) / (len(rows) - 1),
        "curve": [round(x, 3) for x in rewards],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    from rayrlhf.models.architectures import build_architecture

    with tempfile.TemporaryDirectory(prefix="async-speedup-") as tmp_dir:
        tmp = Path(tmp_dir)
        model = build_architecture("qwen2", tmp / f"qwen2-{args.size}", **SIZES[args.size])
        figures = {k: summary(run(model, k, args.steps, args.lr, tmp / f"k{k}")) for k in (0, 1, 2)}
        params = num_params(model)
    print(f"machine: {machine()}; model: Qwen2, {params / 1e6:.2f}M parameters; rollout worker on core 0, "
          f"trainer on core 1; {PROMPTS} prompts x {SAMPLES} samples x {NEW_TOKENS} new tokens per step, {args.steps} steps")
    for k, f in figures.items():
        print(f"k={k}: {f['samples_per_s']:.1f} samples/s; per step: generation {f['rollout_s']:.2f} s, "
              f"train {f['train_s']:.2f} s, waiting for samples {f['wait_s']:.2f} s; staleness max {f['staleness_max']:.0f}; "
              f"reward first 5 steps {f['reward_first5']:.3f}, last 5 steps {f['reward_last5']:.3f}")
        print(f"  reward by step: {f['curve']}")
    base, one, two = figures[0], figures[1], figures[2]
    result("async_samples_per_s_k1_vs_k0", one["samples_per_s"], base["samples_per_s"], size=args.size,
           k2_ratio=round(two["samples_per_s"] / base["samples_per_s"], 4),
           reward_last5={k: round(f["reward_last5"], 4) for k, f in figures.items()})


if __name__ == "__main__":
    main()

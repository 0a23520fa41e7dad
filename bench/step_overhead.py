"""Orchestration overhead and streaming overlap of the online loop, at the demo's scale.

Two GRPO runs of the local `sort` job on the same machine, the engine decoding one
micro-batch of sequences at a time (as a GPU engine does when a step's samples exceed its
batch), and the reward made slower than the generation of one micro-batch (a reward function
that sleeps, standing in for a reward model or a remote judge):
- streamed: scoring starts on each finished micro-batch while generation goes on;
- baseline: the same job with one micro-batch per step, i.e. generate everything, then score.
Reported: samples/s of both (the JSON line), the streamed run's orchestration overhead (step
time minus the phases where actors work: rollout+scoring, training, weight sync) as a share of
the step, and its `timing/overlap_frac`.

    python bench/step_overhead.py [--steps 8] [--reward-sleep 0.05]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

from common import machine, result

ROOT = Path(__file__).resolve().parents[1]

SLOW_REWARD = '''
import time
from rayrlhf.rewards.tasks import sort_reward

def reward(prompts, responses, answer, **_):
    time.sleep({sleep} * len(responses))
    return sort_reward(prompts, responses, answer)
'''


def run(tmp: Path, name: str, steps: int, micro: int, reward: Path, seqs: int, max_new: int) -> list[dict]:
    from rayrlhf.config import load_config
    from rayrlhf.launch.run import run_job
    from rayrlhf.orchestrator.metrics import read_metrics

    cfg = load_config(ROOT / "cluster_configs/local-cpu/grpo.yaml", [
        f"output_dir={tmp / name}", "ray.include_dashboard=false", f"schedule.steps={steps}", "checkpoint.every=0",
        f"rollout.micro_batch_size={micro}", f"reward.function={reward}:reward", f"rollout.max_num_seqs={seqs}",
        f"rollout.max_new_tokens={max_new}",
    ])
    run_job(cfg)
    return read_metrics(tmp / name / "metrics.jsonl")[1:]  # step 1 includes warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--reward-sleep", type=float, default=0.01, help="seconds of reward time per sample")
    parser.add_argument("--micro", type=int, default=8, help="samples per streamed scoring micro-batch")
    parser.add_argument("--max-num-seqs", type=int, default=8, help="sequences the engine decodes at once")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.chdir(ROOT)  # the shipped config names its data relative to the repository root
    tmp = Path(tempfile.mkdtemp(prefix="rayrlhf-bench-"))
    reward = tmp / "slow_reward.py"
    reward.write_text(SLOW_REWARD.format(sleep=args.reward_sleep))
    samples = 16 * 4
    streamed = run(tmp, "streamed", args.steps, args.micro, reward, args.max_num_seqs, args.max_new_tokens)
    baseline = run(tmp, "baseline", args.steps, samples, reward, args.max_num_seqs, args.max_new_tokens)

    def per_s(rows: list[dict]) -> float:
        return samples * len(rows) / sum(r["timing/step_s"] for r in rows)

    overhead = [
        (r["timing/step_s"] - r["timing/rollout_s"] - r["timing/train_s"] - r["timing/sync_s"]) / r["timing/step_s"]
        for r in streamed
    ]
    share = sum(overhead) / len(overhead)
    overlap = sum(r["timing/overlap_frac"] for r in streamed) / len(streamed)
    print(f"{machine()}; {samples} samples/step, reward {args.reward_sleep * 1000:.0f} ms/sample")
    print(f"streamed:  {per_s(streamed):.1f} samples/s, overlap_frac {overlap:.2f}, orchestration overhead {share:.1%} of the step")
    print(f"baseline:  {per_s(baseline):.1f} samples/s (generate all, then score)")
    result("online_samples_per_s", per_s(streamed), per_s(baseline), unit="samples/s",
           baseline_name="generate-then-score", overhead_share=round(share, 4), overlap_frac=round(overlap, 4))


if __name__ == "__main__":
    main()

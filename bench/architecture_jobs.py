"""GRPO and PPO jobs on every row of the architecture matrix, with the weight sync verified after every step.

`tests/test_architectures.py` checks each row's parts (sampling log-probs, verified sync, named
corruption, critic and reward model, export) in `make test`; this runs whole `rayrlhf train`
jobs on each row, which take too long for CI: for every row a GRPO and a PPO job of `--steps`
steps on the local sort prompts (`alphabet_reward`, which a random model learns), with
`schedule.verify_sync_every=1`, generating with vLLM. It reports each job's s/step (median after the first step) and
whether it finished; the baseline of the JSON line is the number of jobs run.

With `--lora RANK` the policy trains a LoRA adapter (a PPO critic trains whole): dense rows sync the adapter into vLLM's
LoRA slots, mixture-of-experts rows the merged weights (`tests/test_lora_matrix.py` runs GRPO on every row, PPO
on two).

    python bench/architecture_jobs.py [--steps 3] [--rows qwen2,phi3] [--tp 1] [--lora 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine, result

ROOT = Path(__file__).resolve().parents[1]


def job(algo: str, row: str, steps: int, tp: int, lora: int, out: Path) -> dict:
    overrides = [f"model.policy=tiny:{row}", "reward.function=rayrlhf.rewards.tasks:alphabet_reward",
                 "schedule.verify_sync_every=1", f"schedule.steps={steps}", "checkpoint.every=0", "data.eval=null",
                 "rollout.backend=vllm",  # `auto` would pick transformers generate for these tiny models
                 f"rollout.tensor_parallel_size={tp}", f"output_dir={out}", "ray.include_dashboard=false"]
    if algo == "ppo":
        overrides.append(f"model.critic=tiny:{row}")
    if lora:
        overrides += [f"model.lora.rank={lora}", "rollout.dtype=float32"]
    cmd = [str(Path(sys.executable).parent / "rayrlhf"), "train", str(ROOT / f"cluster_configs/local-cpu/{algo}.yaml")]
    proc = subprocess.run(cmd + [a for o in overrides for a in ("--set", o)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"ok": False, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"ok": [r["step"] for r in rows] == list(range(1, steps + 1)),
            "s_per_step": statistics.median(r["timing/step_s"] for r in rows[1:]) if len(rows) > 1 else rows[0]["timing/step_s"],
            "reward": (rows[0]["reward/mean"], rows[-1]["reward/mean"])}


def main() -> None:
    from rayrlhf.models.architectures import MATRIX

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", default=",".join(MATRIX), help="comma-separated matrix rows")
    parser.add_argument("--tp", type=int, default=1, help="rollout.tensor_parallel_size")
    parser.add_argument("--lora", type=int, default=0, help="model.lora.rank (0: full fine-tuning)")
    args = parser.parse_args()
    rows = args.rows.split(",")
    print(f"machine: {machine()}; {args.steps} steps per job, sync verified after every step, TP {args.tp}, LoRA rank {args.lora}")
    done = 0
    with tempfile.TemporaryDirectory(prefix="arch-jobs-") as tmp:
        for row in rows:
            for algo in ("grpo", "ppo"):
                out = job(algo, row, args.steps, args.tp, args.lora, Path(tmp) / f"{row}-{algo}")
                done += out["ok"]
                shown = (f"{out['s_per_step']:.2f} s/step, reward {out['reward'][0]:.2f} -> {out['reward'][1]:.2f}"
                         if out["ok"] else f"FAILED: {out.get('error')}")
                print(f"{row:<11} {algo:<5} {shown}", flush=True)
    result("matrix_jobs_verified", done, 2 * len(rows), tp=args.tp, lora=args.lora)


if __name__ == "__main__":
    main()

"""rayrlhf against TRL's GRPOTrainer, per step, on one machine: same task, model and workload.

Workload: 8 prompts x 8 samples x 16 new tokens per step, one optimizer step per batch,
lr 1e-3, no KL, the reward a Python function (`sort_reward`), on a randomly initialised tied
Qwen2 built locally: ~75M parameters (`--size 75m`, width 768, 12 layers) or ~0.06M (`--size
tiny`, width 64, 2 layers... the matrix's tiny row). The two run back to back, each in its own
process: TRL's `GRPOTrainer` (transformers generate, `use_cpu=True`) and `rayrlhf train` with the
local GRPO job and only the workload's overrides (no tuning flags: rayrlhf's defaults). Each
reports s/step as the median of steps 2-6 and the time to its first finished step.

TRL is a benchmark-only dependency: `make bench-deps` installs it (pinned by requirements/bench.lock)
with --no-deps into .bench-deps/, which only the TRL process puts on its path.

    python bench/peer_trl_grpo.py --size 75m      # ends with {"metric": "grpo_step_speed_vs_trl", ...}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, result

ROOT = Path(__file__).resolve().parents[1]
BENCH_DEPS = ROOT / ".bench-deps"
SIZES = {  # build_architecture("qwen2", ...) overrides
    "tiny": {},
    "75m": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 2,
            "intermediate_size": 2048},
}
PROMPTS, SAMPLES, NEW_TOKENS, LR, STEPS = 8, 8, 16, 1e-3, 6


def build(size: str, where: Path) -> Path:
    from rayrlhf.models.architectures import build_architecture

    return build_architecture("qwen2", where / f"qwen2-{size}", **SIZES[size])


def prompts_file(where: Path) -> Path:
    """The local sort prompts with their `answer` column, as plain text (no chat template) for both sides."""
    rows = [json.loads(line) for line in (ROOT / "cluster_configs/local-cpu/data/sort_train.jsonl").read_text().splitlines()]
    path = where / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"] + " =", "answer": r["answer"]}) + "\n" for r in rows[:512]))
    return path


# ------------------------------------------------------------------------------------------ TRL
def trl_child(model: str, prompts: str, out: str) -> None:
    """Runs in the TRL process: GRPOTrainer for STEPS steps, writing each step's end time."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rayrlhf.rewards.tasks import sort_reward

    torch.manual_seed(0)
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - transformers' callback API
            ends.append(time.monotonic())

    def reward(prompts: list[str], completions: list[str], answer: list[str], **_: object) -> list[float]:
        return sort_reward(prompts, completions, answer)  # TRL names the responses `completions`

    rows = [json.loads(line) for line in Path(prompts).read_text().splitlines()]
    args = GRPOConfig(
        output_dir=str(Path(out).parent / "trl"), use_cpu=True, bf16=False, learning_rate=LR, beta=0.0,
        num_generations=SAMPLES, per_device_train_batch_size=PROMPTS * SAMPLES, gradient_accumulation_steps=1,
        max_completion_length=NEW_TOKENS, max_steps=STEPS, logging_steps=1, report_to=[], save_strategy="no",
        temperature=1.0, num_iterations=1, seed=0, dataloader_num_workers=0,
        generation_kwargs={"min_new_tokens": NEW_TOKENS},  # every completion NEW_TOKENS long: the same work per step
    )
    start = time.monotonic()
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), reward_funcs=reward, args=args,
        train_dataset=datasets.Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(model),
        callbacks=[Clock()],
    )
    trainer.train()
    Path(out).write_text(json.dumps({"start": start, "ends": ends}))


def run_trl(model: Path, prompts: Path, tmp: Path) -> dict:
    if not (BENCH_DEPS / "trl").is_dir():
        raise SystemExit(f"TRL is not installed for the benchmark: run `make bench-deps` (installs into {BENCH_DEPS})")
    out = tmp / "trl.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH_DEPS), str(ROOT)]), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.monotonic()
    with open(tmp / "trl.log", "w") as log_file:  # TRL's progress bars and logs
        subprocess.run([sys.executable, __file__, "--trl-child", str(model), str(prompts), str(out)], env=env, check=True,
                       cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    times = json.loads(out.read_text())
    steps = [b - a for a, b in zip([times["start"]] + times["ends"][:-1], times["ends"], strict=True)]
    return {"steps": steps, "first_step_s": times["ends"][0] - t0}


# ------------------------------------------------------------------------------------- rayrlhf
def run_rayrlhf(model: Path, prompts: Path, tmp: Path) -> dict:
    out = tmp / "rayrlhf"
    overrides = [
        f"model.policy={model}", f"data.train={prompts}", "data.eval=null", "data.apply_chat_template=false",
        "algorithm.name=grpo", f"algorithm.group_size={SAMPLES}", "algorithm.kl_coef=0",
        f"schedule.prompts_per_step={PROMPTS}", f"schedule.steps={STEPS}", f"rollout.max_new_tokens={NEW_TOKENS}",
        "rollout.temperature=1.0", f"rollout.min_new_tokens={NEW_TOKENS}", f"trainer.policy.lr={LR}",
        "trainer.mini_batch_size=null",
        "reward.function=rayrlhf.rewards.tasks:sort_reward", "checkpoint.every=0", f"output_dir={out}",
        "ray.include_dashboard=false",
    ]
    cmd = [str(Path(sys.executable).parent / "rayrlhf"), "train", str(ROOT / "cluster_configs/local-cpu/grpo.yaml")]
    t0 = time.monotonic()
    subprocess.run(cmd + [a for o in overrides for a in ("--set", o)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=open(tmp / "rayrlhf.log", "w"))
    total = time.monotonic() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["timing/step_s"] for r in rows if r.get("step", 0) > 0]
    phases = {k: statistics.median(r[f"timing/{k}_s"] for r in rows[1:]) for k in ("rollout", "train", "sync")}
    return {"steps": steps, "phases": phases, "total_s": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="75m")
    parser.add_argument("--trl-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_child:
        trl_child(*args.trl_child)
        return
    from common import num_params

    with tempfile.TemporaryDirectory(prefix="peer-trl-") as tmp_dir:
        tmp = Path(tmp_dir)
        model, prompts = build(args.size, tmp), prompts_file(tmp)
        trl = run_trl(model, prompts, tmp)
        ours = run_rayrlhf(model, prompts, tmp)
        trl_step, our_step = statistics.median(trl["steps"][1:]), statistics.median(ours["steps"][1:])
        print(f"machine: {machine()}; model: Qwen2, {num_params(model) / 1e6:.2f}M parameters; "
              f"{PROMPTS} prompts x {SAMPLES} samples x {NEW_TOKENS} new tokens per step")
        print(f"TRL {_version()} GRPOTrainer: {trl_step:.3f} s/step (median of steps 2-{STEPS}; all: "
              f"{', '.join(f'{s:.2f}' for s in trl['steps'])}), first step done {trl['first_step_s']:.1f} s after launch")
        print(f"rayrlhf train: {our_step:.3f} s/step (all: {', '.join(f'{s:.2f}' for s in ours['steps'])}); phases (median): "
              + ", ".join(f"{k} {v:.3f} s" for k, v in ours["phases"].items())
              + f"; whole command {ours['total_s']:.1f} s for {STEPS} steps")
        result("grpo_step_speed_vs_trl", 1.0 / our_step, 1.0 / trl_step, size=args.size,
               rayrlhf_s_per_step=round(our_step, 4), trl_s_per_step=round(trl_step, 4))


def _version() -> str:
    found = sorted(BENCH_DEPS.glob("trl-*.dist-info"))
    return found[0].name.removeprefix("trl-").removesuffix(".dist-info") if found else "?"


if __name__ == "__main__":
    main()

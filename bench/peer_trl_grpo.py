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

`--to-reward R` measures instead what users wait for: wall-clock time from launching the command
until the mean reward over five consecutive steps reaches R, on a task a random model can learn
(`alphabet_reward`, 8 prompts x 8 samples x 24 tokens, lr 1e-3, the 3M Qwen2 of
bench/async_speedup.py by default), each system in its recommended one-machine setup: rayrlhf in
the asynchronous mode (schedule.max_staleness 1) with generation on core 0 and training on core
1, TRL's GRPOTrainer with its defaults. Each system is stopped once it is there (rayrlhf by
SIGTERM, which it answers at the next step boundary; TRL from a callback). `--runs N` repeats the
pair; the ratio is the median of the runs' ratios.

    python bench/peer_trl_grpo.py --to-reward 0.9 --runs 3   # ends with {"metric": "time_to_reward_vs_trl", ...}
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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
    "3m": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 768},  # bench/async_speedup.py's "small"
    "75m": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 2,
            "intermediate_size": 2048},
}
PROMPTS, SAMPLES, NEW_TOKENS, LR, STEPS = 8, 8, 16, 1e-3, 6
# --to-reward: the task and workload, and how many steps either system gets at most
REWARD_TASK, REWARD_NEW_TOKENS, REWARD_MAX_STEPS, REWARD_WINDOW = "alphabet_reward", 24, 80, 5


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
def trl_child(model: str, prompts: str, out: str, target: float | None = None) -> None:
    """Runs in the TRL process: GRPOTrainer for STEPS steps (with `target`: until the mean reward of the last
    REWARD_WINDOW steps reaches it), writing each step's end time (Unix seconds) and mean reward."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rayrlhf.rewards import tasks

    torch.manual_seed(0)
    ends: list[float] = []
    rewards: list[float] = []
    task = getattr(tasks, REWARD_TASK if target is not None else "sort_reward")
    new_tokens = REWARD_NEW_TOKENS if target is not None else NEW_TOKENS

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - transformers' callback API
            ends.append(time.time())

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs and "reward" in logs:
                rewards.append(float(logs["reward"]))
                if target is not None and len(rewards) >= REWARD_WINDOW and statistics.fmean(rewards[-REWARD_WINDOW:]) >= target:
                    control.should_training_stop = True

    def reward(prompts: list[str], completions: list[str], answer: list[str], **_: object) -> list[float]:
        return task(prompts, completions, answer=answer)  # TRL names the responses `completions`

    rows = [json.loads(line) for line in Path(prompts).read_text().splitlines()]
    args = GRPOConfig(
        output_dir=str(Path(out).parent / "trl"), use_cpu=True, bf16=False, learning_rate=LR, beta=0.0,
        num_generations=SAMPLES, per_device_train_batch_size=PROMPTS * SAMPLES, gradient_accumulation_steps=1,
        max_completion_length=new_tokens, max_steps=STEPS if target is None else REWARD_MAX_STEPS, logging_steps=1,
        report_to=[], save_strategy="no", temperature=1.0, num_iterations=1, seed=0, dataloader_num_workers=0,
        generation_kwargs={"min_new_tokens": new_tokens},  # every completion new_tokens long: the same work per step
    )
    start = time.time()
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), reward_funcs=reward, args=args,
        train_dataset=datasets.Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(model),
        callbacks=[Clock()],
    )
    trainer.train()
    Path(out).write_text(json.dumps({"start": start, "ends": ends, "rewards": rewards}))


def run_trl(model: Path, prompts: Path, tmp: Path, target: float | None = None) -> dict:
    if not (BENCH_DEPS / "trl").is_dir():
        raise SystemExit(f"TRL is not installed for the benchmark: run `make bench-deps` (installs into {BENCH_DEPS})")
    out = tmp / "trl.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH_DEPS), str(ROOT)]), "TOKENIZERS_PARALLELISM": "false"}
    child = ["--trl-child", str(model), str(prompts), str(out)] + (["--to-reward", str(target)] if target is not None else [])
    t0 = time.time()
    with open(tmp / "trl.log", "w") as log_file:  # TRL's progress bars and logs
        subprocess.run([sys.executable, __file__, *child], env=env, check=True, cwd=ROOT, stdout=log_file,
                       stderr=subprocess.STDOUT)
    total = time.time() - t0
    times = json.loads(out.read_text())
    steps = [b - a for a, b in zip([times["start"]] + times["ends"][:-1], times["ends"], strict=True)]
    return {"steps": steps, "first_step_s": times["ends"][0] - t0, "total_s": total,
            "reached_s": _reached(times["rewards"], times["ends"], target, t0), "rewards": times["rewards"]}


def _reached(rewards: list[float], ends: list[float], target: float | None, t0: float) -> float | None:
    """Seconds from t0 to the end of the first step whose last REWARD_WINDOW steps' mean reward is >= target."""
    if target is None:
        return None
    for i in range(REWARD_WINDOW - 1, len(rewards)):
        if statistics.fmean(rewards[i - REWARD_WINDOW + 1:i + 1]) >= target:
            return ends[i] - t0
    return None


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


def run_rayrlhf_to_reward(model: Path, prompts: Path, tmp: Path, target: float) -> dict:
    """rayrlhf's recommended one-machine setup (asynchronous, generation and training on their own cores), stopped
    with SIGTERM once the mean reward of the last REWARD_WINDOW steps reaches `target`."""
    out = tmp / "rayrlhf-reward"
    overrides = [
        f"model.policy={model}", f"data.train={prompts}", "data.eval=null", "data.apply_chat_template=false",
        "algorithm.name=grpo", f"algorithm.group_size={SAMPLES}", "algorithm.kl_coef=0",
        f"schedule.prompts_per_step={PROMPTS}", f"schedule.steps={REWARD_MAX_STEPS}", "schedule.max_staleness=1",
        f"rollout.max_new_tokens={REWARD_NEW_TOKENS}", f"rollout.min_new_tokens={REWARD_NEW_TOKENS}",
        "rollout.temperature=1.0", "rollout.cpus=[0]", "rollout.num_threads=1", "trainer.policy.cpus=[1]",
        "trainer.policy.num_threads=1", f"trainer.policy.lr={LR}", "trainer.mini_batch_size=null",
        f"reward.function=rayrlhf.rewards.tasks:{REWARD_TASK}", "checkpoint.every=0", f"output_dir={out}",
        "ray.include_dashboard=false",
    ]
    cmd = [str(Path(sys.executable).parent / "rayrlhf"), "train", str(ROOT / "cluster_configs/local-cpu/grpo.yaml")]
    metrics = out / "metrics.jsonl"
    t0 = time.time()
    proc = subprocess.Popen(cmd + [a for o in overrides for a in ("--set", o)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "rayrlhf-reward.log", "w"))
    rows: list[dict] = []
    reached = None
    while proc.poll() is None and reached is None:
        time.sleep(0.2)
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        reached = _reached([r["reward/mean"] for r in rows], [r["time"] for r in rows], target, t0)
    if reached is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # stops at the next step boundary (with a checkpoint, not timed)
    code = proc.wait(timeout=300)
    if code not in (0, 75):  # 75: stopped by the SIGTERM above, with a checkpoint
        raise SystemExit(f"rayrlhf train exited with {code}: see {tmp / 'rayrlhf-reward.log'}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {"first_step_s": rows[0]["time"] - t0, "reached_s": reached, "rewards": [r["reward/mean"] for r in rows]}


def to_reward(size: str, target: float, runs: int) -> None:
    from common import num_params

    pairs = []
    for run in range(runs):
        with tempfile.TemporaryDirectory(prefix="peer-trl-reward-") as tmp_dir:
            tmp = Path(tmp_dir)
            model, prompts = build(size, tmp), prompts_file(tmp)
            params = num_params(model)
            trl, ours = run_trl(model, prompts, tmp, target), run_rayrlhf_to_reward(model, prompts, tmp, target)
        pairs.append((trl, ours))
        for name, r in (("TRL", trl), ("rayrlhf", ours)):
            reached = f"{r['reached_s']:.1f} s" if r["reached_s"] is not None else f"not within {REWARD_MAX_STEPS} steps"
            print(f"run {run + 1}: {name}: reward {target} reached {reached} after launch; first step done "
                  f"{r['first_step_s']:.1f} s after launch; {len(r['rewards'])} steps; rewards "
                  f"{[round(x, 2) for x in r['rewards']]}", flush=True)
    missed = [i + 1 for i, (t, o) in enumerate(pairs) if t["reached_s"] is None or o["reached_s"] is None]
    if missed:
        raise SystemExit(f"run(s) {missed}: a system did not reach {target} within {REWARD_MAX_STEPS} steps")
    ratios = [t["reached_s"] / o["reached_s"] for t, o in pairs]
    after_first = [(t["reached_s"] - t["first_step_s"]) / (o["reached_s"] - o["first_step_s"]) for t, o in pairs]
    trl_s, our_s = statistics.median(t["reached_s"] for t, _ in pairs), statistics.median(o["reached_s"] for _, o in pairs)
    print(f"machine: {machine()}; model: Qwen2, {params / 1e6:.2f}M parameters; {REWARD_TASK}, {PROMPTS} prompts x "
          f"{SAMPLES} samples x {REWARD_NEW_TOKENS} new tokens per step, lr {LR}; TRL {_version()}")
    print(f"time to a mean reward of {target} over {REWARD_WINDOW} steps (median of {runs}): TRL {trl_s:.1f} s, rayrlhf "
          f"{our_s:.1f} s; ratios {[round(r, 2) for r in ratios]}; counted from each system's first step instead: "
          f"{[round(r, 2) for r in after_first]}")
    result("time_to_reward_vs_trl", 1.0 / our_s, 1.0 / trl_s, size=size, target=target, runs=runs,
           ratio_median=round(statistics.median(ratios), 4), trl_s=round(trl_s, 2), rayrlhf_s=round(our_s, 2),
           ratio_after_first_step=round(statistics.median(after_first), 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="the model (default: 75m per step, 3m with --to-reward)")
    parser.add_argument("--to-reward", type=float, default=None, metavar="R",
                        help="time to a mean reward of R over 5 steps instead of time per step")
    parser.add_argument("--runs", type=int, default=1, help="with --to-reward: pairs of runs (the ratio is their median)")
    parser.add_argument("--trl-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_child:
        trl_child(*args.trl_child, target=args.to_reward)
        return
    if args.to_reward is not None:
        to_reward(args.size or "3m", args.to_reward, args.runs)
        return
    args.size = args.size or "75m"
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

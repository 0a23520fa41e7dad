"""`rayrlhf demo`: the InstructGPT pipeline (SFT -> reward model -> PPO) on one CPU machine, in minutes.

    task     a tiny Llama and character tokenizer built locally, and the `sort` task's data under
             DIR/data: demonstrations (20% carry a labeller's slip), comparisons, prompts for PPO
             and held-out prompts. The rule `sort_score` stands in for the human labellers.
    1. sft   `rayrlhf train` with algorithm.name=sft from the random model       -> DIR/sft/final
    2. rm    comparisons as InstructGPT collects them: 4 samples of the SFT model per prompt,
             ranked by the rule (best vs worst), plus correct-vs-slipped pairs; a Bradley-Terry
             reward model initialised from the SFT model                        -> DIR/rm/final
    3. ppo   PPO against the learned reward: policy and reference = the SFT model, critic = the
             reward model; vLLM rollouts, DeepSpeed trainers                    -> DIR/ppo/final
    then     the rule's score of each model's responses to held-out prompts    -> DIR/summary.json
             and each stage's curves and transcripts (`rayrlhf report`)         -> DIR/{sft,rm,ppo}/report.html

All three stages are ordinary jobs (each writes config.yaml, metrics.jsonl and final/ like
`rayrlhf train`) on one embedded local Ray. The rule never reaches training after the data is
written: PPO only sees the learned reward model, and the rule only measures.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rayrlhf.config import JobConfig
from rayrlhf.data.datasets import encode_prompt, format_prompt, load_rows
from rayrlhf.data.demo_data import write_task_data
from rayrlhf.models.tiny import build_tiny_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """The demo's knobs; the defaults are `rayrlhf demo`, tests pass shorter ones."""

    seed: int = 0
    hidden_size: int = 128  # the tiny Llama: 4 layers of 128 (about 0.7M parameters)
    num_layers: int = 4
    noise: float = 0.2  # share of demonstrations with a slip
    n_train: int = 2000
    n_eval: int = 200
    sft_steps: int = 300
    sft_lr: float = 3e-3
    rm_steps: int = 400  # held-out accuracy plateaus near 0.96 from about 300 steps (cosine schedule)
    rm_lr: float = 1e-3
    rm_samples: int = 4  # SFT samples per prompt, ranked by the rule into comparisons
    ppo_steps: int = 40
    ppo_prompts_per_step: int = 64
    ppo_lr: float = 1e-4
    ppo_epochs: int = 1
    critic_lr: float = 1e-4
    kl_coef: float = 0.05
    max_new_tokens: int = 8
    eval_samples: int = 4  # sampled responses per held-out prompt


# ------------------------------------------------------------------------------------ stages
def job(out: Path, name: str, **sections: Any) -> JobConfig:
    """A stage's config: the shared defaults plus its sections (validated like a YAML job)."""
    base: dict[str, Any] = {"output_dir": str(out / name), "data": {"max_prompt_tokens": 32},
                            "checkpoint": {"every": 0}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return JobConfig.model_validate(base)


def stage_configs(out: Path, data: dict[str, Path], base: Path, s: DemoSettings) -> dict[str, JobConfig]:
    """The three jobs; the reward model trains on DIR/data/sort_pairs_rm_train.jsonl, written after SFT."""
    sft, rm = str(out / "sft" / "final"), str(out / "rm" / "final")
    offline_trainer = {"mini_batch_size": 64}
    return {
        "sft": job(out, "sft", seed=s.seed, model={"policy": str(base)}, algorithm={"name": "sft"},
                   data={"train": str(data["sft_train"]), "eval": str(data["sft_eval"])},
                   trainer={**offline_trainer, "policy": {"lr": s.sft_lr, "warmup_steps": 10, "lr_schedule": "cosine"}},
                   schedule={"steps": s.sft_steps, "epochs": 100, "eval_every": 0}),
        "rm": job(out, "rm", seed=s.seed, model={"policy": sft}, algorithm={"name": "rm"},
                  data={"train": str(out / "data" / "sort_pairs_rm_train.jsonl"), "eval": str(data["pairs_eval"])},
                  trainer={**offline_trainer, "policy": {"lr": s.rm_lr, "warmup_steps": 10, "lr_schedule": "cosine"}},
                  schedule={"steps": s.rm_steps, "epochs": 100, "eval_every": 0}),
        "ppo": job(out, "ppo", seed=s.seed, model={"policy": sft, "critic": rm, "reward": rm},
                   algorithm={"name": "ppo", "kl_coef": s.kl_coef, "ppo_epochs": s.ppo_epochs},
                   # the rule scores the held-out prompts during training (never the training samples):
                   # eval/true_reward_mean against eval/reward_mean (the learned reward) shows over-optimisation
                   reward={"eval_function": "rayrlhf.rewards.tasks:sort_reward"},
                   data={"train": str(data["prompts_train"]), "eval": str(data["prompts_eval"])},
                   rollout={"backend": "vllm", "max_new_tokens": s.max_new_tokens, "temperature": 1.0,
                            "dump_every": max(1, s.ppo_steps // 4)},  # samples/ for the report's transcripts
                   trainer={"mini_batch_size": s.ppo_prompts_per_step // 2,
                            "policy": {"lr": s.ppo_lr}, "critic": {"lr": s.critic_lr}},
                   schedule={"steps": s.ppo_steps, "prompts_per_step": s.ppo_prompts_per_step,
                             "eval_every": max(1, s.ppo_steps // 4), "eval_decoding": "sampled", "eval_max_prompts": 64}),
    }


# ------------------------------------------------------------------------------- measuring
@dataclass
class Samples:
    """Responses of one model to the held-out prompts, with the rule's score of each."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    texts: list[str]
    scores: list[float]
    exact: list[bool]

    def per_prompt(self, n: int) -> list[list[str]]:
        """The texts grouped by prompt (`n` responses each)."""
        return [self.texts[i : i + n] for i in range(0, len(self.texts), n)]


def sample(model_dir: str | Path, prompts: list[dict[str, Any]], n: int, greedy: bool, s: DemoSettings) -> Samples:
    """`n` responses per prompt with transformers `generate` (the rollout path's HF engine), scored by the rule."""
    from rayrlhf.actors.engines import HFEngine
    from rayrlhf.actors.types import GenerationRequest, SamplingSpec
    from rayrlhf.models.loading import load_tokenizer
    from rayrlhf.rewards.tasks import sort_score

    tok = load_tokenizer(model_dir)
    engine = HFEngine(model_dir, dtype="float32", seed=s.seed, max_batch_size=4096)
    spec = SamplingSpec(n=n, temperature=0.0 if greedy else 1.0, max_new_tokens=s.max_new_tokens,
                        stop_token_ids=(tok.eos_token_id,), seed=s.seed + 7)
    for i, row in enumerate(prompts):
        engine.add(GenerationRequest(f"p{i}", encode_prompt(tok, format_prompt(tok, row["prompt"], True)), spec))
    done = []
    while engine.has_unfinished():
        done += engine.step()
    done.sort(key=lambda c: (int(c.request_id[1:]), c.sample_index))
    answers = [prompts[int(c.request_id[1:])]["answer"] for c in done]
    texts = [t.strip() for t in tok.batch_decode([c.response_ids for c in done], skip_special_tokens=True)]
    return Samples([c.prompt_ids for c in done], [c.response_ids for c in done], texts,
                   [sort_score(t, a) for t, a in zip(texts, answers, strict=True)],
                   [t == a for t, a in zip(texts, answers, strict=True)])


@torch.no_grad()
def sequence_logps(model_dir: str | Path, samples: Samples) -> torch.Tensor:
    """log π(y | x) of every sampled response under the model in `model_dir`."""
    from rayrlhf.models.forward import pack_batch, token_logprobs
    from rayrlhf.models.loading import load_policy, load_tokenizer

    model = load_policy(model_dir, "float32").eval()
    batch = pack_batch(samples.prompt_ids, samples.response_ids, load_tokenizer(model_dir).pad_token_id)
    return token_logprobs(model, batch)[0].sum(-1)


@torch.no_grad()
def reward_scores(rm_dir: str | Path, samples: Samples) -> torch.Tensor:
    """The learned reward model's score of every sampled response."""
    from rayrlhf.models.forward import pack_batch, sequence_scores
    from rayrlhf.models.loading import load_reward_model, load_tokenizer

    model = load_reward_model(rm_dir, "float32").eval()
    return sequence_scores(model, pack_batch(samples.prompt_ids, samples.response_ids, load_tokenizer(rm_dir).pad_token_id))


def mean(xs: Any) -> float:
    return float(torch.as_tensor(xs, dtype=torch.float64).mean())


def last_eval(metrics_file: Path, key: str, first: bool = False) -> float:
    from rayrlhf.orchestrator.metrics import read_metrics

    rows = [r for r in read_metrics(metrics_file) if key in r]
    return float(rows[0 if first else -1][key])


# ------------------------------------------------------------------------------------ main
def run_demo(output_dir: str | Path = "outputs/demo", settings: DemoSettings | None = None) -> dict[str, Any]:
    """Run the pipeline and return (and write to DIR/summary.json) the summary figures."""
    import ray
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    from rayrlhf.launch.report import write_report
    from rayrlhf.launch.run import run_job

    hf_logging.disable_progress_bar()  # the stages' own progress is what matters here
    s = settings or DemoSettings()
    out = Path(output_dir).resolve()
    console = Console(stderr=False)
    t_start = time.monotonic()
    console.rule("[bold]rayrlhf demo: SFT → reward model → PPO on a tiny model, on CPU")
    base = build_tiny_model(out / "base", hidden_size=s.hidden_size, num_layers=s.num_layers,
                            num_heads=s.hidden_size // 32, intermediate_size=2 * s.hidden_size, seed=s.seed)
    data = write_task_data(out / "data", s.n_train, s.n_eval, s.noise, s.seed)
    held_out = load_rows(str(data["prompts_eval"]), "prompt")
    console.print(f"task [bold]sort[/] (sort 3-6 distinct letters): {s.n_train} demonstrations ({s.noise:.0%} with a slip), "
                  f"{s.n_train} prompts for comparisons and PPO, {s.n_eval} held-out prompts; a "
                  f"{s.num_layers}-layer Llama of width {s.hidden_size}; everything under {out}")
    cfgs = stage_configs(out, data, base, s)
    for name in cfgs:  # the demo's own stage folders: a new demo run replaces the previous one
        if (out / name).exists():
            shutil.rmtree(out / name)
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 8), include_dashboard=False, log_to_driver=False)
    timings: dict[str, float] = {}
    reports: dict[str, Path] = {}
    try:
        descriptions = {
            "sft": f"supervised fine-tuning on the demonstrations ({s.sft_steps} steps)",
            "rm": f"reward model on comparisons, from the SFT model ({s.rm_steps} steps)",
            "ppo": f"PPO against the reward model, vLLM rollouts ({s.ppo_steps} steps × {s.ppo_prompts_per_step} prompts)",
        }
        for i, (name, cfg) in enumerate(cfgs.items(), start=1):
            console.rule(f"[bold cyan]{i}/3 {name}[/]: {descriptions[name]}")
            t0 = time.monotonic()
            if name == "rm":
                n = rank_sft_samples(out, data, s)
                console.print(f"comparisons: {n} from SFT samples ranked by the rule + {s.n_train} correct-vs-slipped")
            run_job(cfg)
            reports[name] = write_report(cfg.output_dir)
            timings[f"timing/{name}_s"] = round(time.monotonic() - t0, 1)
    finally:
        if started:
            ray.shutdown()
    console.rule("[bold cyan]measuring[/]: the rule's score of each model's responses to the held-out prompts")
    t0 = time.monotonic()
    summary = measure(out, base, held_out, s)
    timings["timing/measure_s"] = round(time.monotonic() - t0, 1)
    summary.update(timings)
    summary["timing/total_s"] = round(time.monotonic() - t_start, 1)
    summary["settings"] = asdict(s)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    console.print(summary_table(summary))
    console.print(f"true score: the rule's mean score of {summary['decoding']}.")
    console.print(f"wall time: sft {summary['timing/sft_s']:.0f} s, rm {summary['timing/rm_s']:.0f} s (with ranking the SFT "
                  f"samples), ppo {summary['timing/ppo_s']:.0f} s, total {summary['timing/total_s']:.0f} s")
    console.print(f"outputs: {out}/{{sft,rm,ppo}}/ (config.yaml, metrics.jsonl, final/) and {out / 'summary.json'}")
    console.print("reports (open in a browser): " + ", ".join(str(path) for path in reports.values()))
    return summary


def rank_sft_samples(out: Path, data: dict[str, Path], s: DemoSettings) -> int:
    """The labellers' comparisons: SFT samples for the PPO prompts ranked by the rule, plus the
    correct-vs-slipped pairs; written to DIR/data/sort_pairs_rm_train.jsonl. Returns the ranked count."""
    from rayrlhf.data.demo_data import ranked_pairs
    from rayrlhf.data.tasks import write_jsonl

    prompts = load_rows(str(data["prompts_train"]), "prompt")
    samples = sample(out / "sft" / "final", prompts, s.rm_samples, False, s)
    ranked = ranked_pairs(prompts, samples.per_prompt(s.rm_samples), s.seed)
    slipped = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in load_rows(str(data["pairs_train"]), "pairs")]
    write_jsonl(ranked + slipped, out / "data" / "sort_pairs_rm_train.jsonl")
    return len(ranked)


def rm_agreement(rm_dir: Path, held_out: list[dict[str, Any]], samples: Samples, n: int, s: DemoSettings) -> float:
    """Share of held-out comparisons of SFT samples (best vs worst by the rule, as the RM's training
    comparisons are made) that the reward model orders like the rule."""
    from rayrlhf.data.demo_data import ranked_pairs

    groups = samples.per_prompt(n)
    index = {(i // n, t): i for i, t in reversed(list(enumerate(samples.texts)))}  # first sample of each text
    chosen, rejected = [], []
    for i, (row, group) in enumerate(zip(held_out, groups, strict=True)):
        for pair in ranked_pairs([row], [group], s.seed + i):
            chosen.append(index[(i, pair["chosen"])])
            rejected.append(index[(i, pair["rejected"])])
    scores = reward_scores(rm_dir, samples)
    return mean((scores[chosen] > scores[rejected]).float()) if chosen else float("nan")


def measure(out: Path, base: Path, held_out: list[dict[str, Any]], s: DemoSettings) -> dict[str, Any]:
    models = {"before_sft": base, "after_sft": out / "sft" / "final", "after_ppo": out / "ppo" / "final"}
    rm_dir = out / "rm" / "final"
    summary: dict[str, Any] = {
        "decoding": f"{s.eval_samples} responses per held-out prompt sampled at temperature 1 (greedy: one), "
                    f"with transformers generate, at most {s.max_new_tokens} new tokens",
        "held_out_prompts": len(held_out),
    }
    sampled = {}
    for stage, path in models.items():
        sampled[stage] = sample(path, held_out, s.eval_samples, False, s)
        greedy = sample(path, held_out, 1, True, s)
        summary[f"true_score/{stage}"] = mean(sampled[stage].scores)
        summary[f"exact/{stage}"] = mean(sampled[stage].exact)
        summary[f"true_score_greedy/{stage}"] = mean(greedy.scores)
        summary[f"rm_score/{stage}"] = mean(reward_scores(rm_dir, sampled[stage]))
    # KL(π_ppo ‖ π_sft) per response, Monte Carlo over the PPO model's own samples (k1 estimator).
    ppo = sampled["after_ppo"]
    summary["kl/ppo_to_sft"] = mean(sequence_logps(models["after_ppo"], ppo) - sequence_logps(models["after_sft"], ppo))
    summary["kl/ppo_train_last_seq_mean"] = last_eval(out / "ppo" / "metrics.jsonl", "kl/seq_mean")
    summary["rm/eval_accuracy"] = last_eval(out / "rm" / "metrics.jsonl", "eval/accuracy")
    summary["rm/agreement_on_sft_samples"] = rm_agreement(rm_dir, held_out, sampled["after_sft"], s.eval_samples, s)
    summary["rm/eval_margin"] = last_eval(out / "rm" / "metrics.jsonl", "eval/margin")
    summary["sft/eval_loss_before"] = last_eval(out / "sft" / "metrics.jsonl", "eval/loss", first=True)
    summary["sft/eval_loss_after"] = last_eval(out / "sft" / "metrics.jsonl", "eval/loss")
    summary["ppo/reward_first"] = last_eval(out / "ppo" / "metrics.jsonl", "reward/mean", first=True)
    summary["ppo/reward_last"] = last_eval(out / "ppo" / "metrics.jsonl", "reward/mean")
    summary["outputs"] = {name: str(out / name) for name in ("sft", "rm", "ppo")}
    return summary


def summary_table(summary: dict[str, Any]) -> Any:
    from rich.table import Table

    n = summary["held_out_prompts"]
    table = Table(title=f"InstructGPT demo: sort task, {n} held-out prompts", title_style="bold")
    table.add_column("figure")
    for stage in ("before SFT", "after SFT", "after PPO"):
        table.add_column(stage, justify="right")

    def row(label: str, key: str, fmt: str = "{:.3f}") -> None:
        table.add_row(label, *(fmt.format(summary[f"{key}/{st}"]) for st in ("before_sft", "after_sft", "after_ppo")))

    row("true score (rule), sampled", "true_score")
    row("exactly right, sampled", "exact", "{:.1%}")
    row("true score (rule), greedy", "true_score_greedy")
    row("learned reward (RM), sampled", "rm_score")
    table.add_row("KL to the SFT model, nats/response", "", "0", f"{summary['kl/ppo_to_sft']:.3f}")
    table.add_section()
    table.add_row("RM: held-out pair accuracy", "", f"{summary['rm/eval_accuracy']:.1%}", "")
    table.add_row("RM: agrees with rule on SFT samples", "", f"{summary['rm/agreement_on_sft_samples']:.1%}", "")
    table.add_row("SFT: held-out NLL per token", f"{summary['sft/eval_loss_before']:.3f}",
                  f"{summary['sft/eval_loss_after']:.3f}", "")
    return table

"""`rayrlhf eval CHECKPOINT_OR_DIR --data FILE`: evaluate any saved policy as training evaluates it.

What CHECKPOINT_OR_DIR may be, and the policy taken from it:
- a run's output_dir: its `final/`, else its latest checkpoint;
- a run's `final/` or one checkpoint folder (`checkpoints/step_N/`);
- a plain Hugging Face model folder (then `--config JOB.yaml` says how to reward it).
A checkpoint (any ZeRO stage) or a LoRA adapter becomes a Hugging Face model first, with `rayrlhf export`'s
code (merged), in a scratch folder under the run's `eval/` that is removed afterwards.

The job config is the run's `config.yaml` (its reward function, reward model or environment, its decoding and
`schedule.eval_*` settings), or `--config`, with `--set` overrides; the data is `--data`. The figures are written
as JSON (default `<output_dir>/eval/<policy>-<data>.json`) and printed as a table. Bad input (no data file, no
policy where one was looked for, a config without a reward) exits 2 before Ray starts.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayrlhf.errors import InvalidInput

log = logging.getLogger(__name__)


@dataclass
class PolicySource:
    """Where the policy comes from: `model` (a Hugging Face folder) or `run` + `step` (a checkpoint, or final/ with a
    LoRA adapter, exported before use)."""

    label: str  # "final", "step_N" or the model folder's name: names the output file
    origin: Path  # the folder the weights come from (final/, a checkpoint folder or the model folder)
    step: int  # the training step it is (for request ids and the JSON); 0 for a plain model
    run: Path | None = None  # the run's output_dir, when the policy comes from a run
    model: Path | None = None  # a Hugging Face folder to use as it is
    checkpoint: int | None = None  # export checkpoint step_N of `run`
    merge_final: bool = False  # export `run`'s final/ adapter merged into its base


def _step_of(folder: Path) -> int | None:
    name = folder.name.removeprefix("step_")
    return int(name) if folder.name.startswith("step_") and name.isdigit() else None


def _run_steps(run: Path) -> int:
    from rayrlhf.config import load_config

    return load_config(run / "config.yaml").schedule.steps


def find_policy(path: str | Path) -> PolicySource:
    """What `path` holds (see the module docstring); InvalidInput naming what was looked for when it holds no policy."""
    from rayrlhf.orchestrator.checkpoint import STATE_FILE, latest_checkpoint

    p = Path(path)
    if not p.exists():
        raise InvalidInput(f"{p}: no such file or folder (expected a run's output_dir, a checkpoint folder or a model folder)")
    if (p / "config.yaml").is_file():  # a run's output_dir
        if (p / "final").is_dir():
            return _final(p)
        folder = latest_checkpoint(p / "checkpoints")
        if folder is None:
            raise InvalidInput(f"{p}: this run has no policy to evaluate: looked for {p / 'final'}/ and a complete checkpoint "
                               f"named by {p / 'checkpoints' / 'latest'}; found neither")
        return PolicySource(folder.name, folder, _step_of(folder) or 0, run=p, checkpoint=_step_of(folder))
    if (p / STATE_FILE).is_file() and _step_of(p) is not None and (p.parent.parent / "config.yaml").is_file():
        return PolicySource(p.name, p, _step_of(p) or 0, run=p.parent.parent, checkpoint=_step_of(p))
    if p.name == "final" and (p.parent / "config.yaml").is_file():
        return _final(p.parent)
    if (p / "config.json").is_file():
        return PolicySource(p.name, p, 0, model=p)
    if (p / "adapter_config.json").is_file():
        raise InvalidInput(f"{p} holds a LoRA adapter outside a run: merge it into its base first (rayrlhf export "
                           "--merge) and evaluate the merged folder")
    raise InvalidInput(f"{p}: no policy found: not a run's output_dir (config.yaml), a checkpoint folder "
                       f"({STATE_FILE}), a run's final/ or a Hugging Face model folder (config.json)")


def _final(run: Path) -> PolicySource:
    final = run / "final"
    if (final / "config.json").is_file():
        return PolicySource("final", final, _run_steps(run), run=run, model=final)
    if (final / "adapter_config.json").is_file():
        return PolicySource("final", final, _run_steps(run), run=run, merge_final=True)
    raise InvalidInput(f"{final}: neither a Hugging Face model (config.json) nor a LoRA adapter (adapter_config.json)")


def _materialise(source: PolicySource, scratch: Path) -> Path:
    """The policy as a Hugging Face folder: as it is, or exported (merged) into `scratch`."""
    from rayrlhf.launch.export import export

    if source.model is not None:
        return source.model
    assert source.run is not None
    log.info("exporting %s of %s for the evaluation", source.label, source.run)
    from rayrlhf.config import load_config

    lora = load_config(source.run / "config.yaml").model.lora is not None
    return export(source.run, step=source.checkpoint, merge=source.merge_final or lora, dest=scratch)


def eval_config(source: PolicySource, data: str, config: str | None, overrides: list[str]) -> Any:
    """The job config of the evaluation: the run's (or --config), --set applied, data.eval = `data`."""
    from rayrlhf.config import load_config

    if config is None and source.run is None:
        raise InvalidInput(f"{source.model} is a model folder with no run around it: pass --config JOB.yaml to say how to "
                           "reward it (reward.function, reward.functions, model.reward or env) and how to decode")
    path = Path(config) if config is not None else source.run / "config.yaml"  # type: ignore[operator]
    quoted = json.dumps(str(data))  # a JSON string is a YAML string, whatever the path holds
    cfg = load_config(path, [*overrides, f"data.eval={quoted}", f"data.train={quoted}"])
    if source.run is not None:
        cfg.output_dir = str(source.run)  # the run's own models (.models/) and fault dumps
    return cfg


def run_eval(path: str, data: str, config: str | None = None, overrides: list[str] | None = None,
             output: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Evaluate the policy at `path` on `data`; returns the JSON file written and its content."""
    from rayrlhf.orchestrator.eval_job import eval_preflight

    if not Path(data).is_file():
        raise InvalidInput(f"--data {data}: no such file")
    source = find_policy(path)
    cfg = eval_config(source, data, config, list(overrides or []))
    cfg.model.lora = None  # the engines serve a whole (merged) model
    if source.model is not None:
        cfg.model.policy = str(source.model)
    # Checked before any export (minutes for a large checkpoint): an exported policy keeps its run's tokenizer,
    # the one of the run's model.policy.
    checked = eval_preflight(cfg)
    out = Path(output) if output else Path(cfg.output_dir) / "eval" / f"{source.label}-{Path(data).stem}.json"
    scratch_root = Path(cfg.output_dir) / "eval"
    scratch_root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".policy-{source.label}-", dir=scratch_root))
    try:
        checked.policy = cfg.model.policy = str(_materialise(source, scratch / "model"))
        result = _evaluate(cfg, checked, source)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return out, result


def _evaluate(cfg: Any, checked: Any, source: PolicySource) -> dict[str, Any]:
    import ray

    from rayrlhf.launch.ray_init import connect
    from rayrlhf.orchestrator.eval_job import run_evaluation
    from rayrlhf.orchestrator.evaluation import eval_max_new_tokens

    mode = connect(cfg)
    try:
        done = run_evaluation(cfg, checked, source.step)
    finally:
        if mode == "embedded":
            ray.shutdown()
    s = cfg.schedule
    return {
        "policy": str(source.origin), "step": source.step, "data": str(cfg.data.eval), "prompts": done["prompts"],
        "settings": {"eval_decoding": s.eval_decoding, "eval_samples": s.eval_samples, "eval_pass_k": s.eval_pass_k,
                     "eval_pass_threshold": s.eval_pass_threshold, "eval_max_prompts": s.eval_max_prompts,
                     "eval_subset_seed": s.eval_subset_seed, "max_new_tokens": eval_max_new_tokens(cfg),
                     "temperature": cfg.rollout.temperature, "seed": cfg.seed, "backend": cfg.rollout.backend},
        "metrics": {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in done["figures"].items()},
    }


def table(result: dict[str, Any]) -> str:
    """The figures as a small text table: one row per figure, one column per decoding mode."""
    modes = ["greedy", "sampled"] if result["settings"]["eval_decoding"] == "both" else [result["settings"]["eval_decoding"]]
    names: list[str] = []
    for key in result["metrics"]:
        for mode in modes:
            prefix = f"eval/{mode}/"
            if key.startswith(prefix) and key.removeprefix(prefix) not in names:
                names.append(key.removeprefix(prefix))

    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.4f}" if isinstance(value, float) and not float(value).is_integer() else f"{value:g}"

    width = max(len(n) for n in names) if names else 10
    lines = [f"{result['policy']} on {result['data']} ({result['prompts']} prompts)",
             " " * width + "".join(f"  {m:>10}" for m in modes)]
    for name in names:
        lines.append(f"{name:<{width}}" + "".join(f"  {cell(result['metrics'].get(f'eval/{m}/{name}')):>10}" for m in modes))
    return "\n".join(lines)

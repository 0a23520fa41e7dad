"""`rayrlhf export OUTPUT_DIR [--step N] [--merge] [--out DIR]`: a run's weights as a Hugging Face model.

Works on a finished or a stopped run alike, on one machine, without Ray:

- no `--step`: `final/` when the run finished (a LoRA run's adapter is merged into the base with
  `--merge`, into OUTPUT_DIR/merged/ by default), else the latest checkpoint;
- `--step N`: checkpoint N (`checkpoints/step_N/`), whatever ZeRO stage and rank count wrote it
  (DeepSpeed's own `zero_to_fp32` consolidates the shards), into OUTPUT_DIR/export/step_N/: the
  whole model, or for a LoRA run the adapter in peft's format, merged with `--merge`.

The base model is the run's `model.policy` (a `tiny` model is the one the run built under
OUTPUT_DIR/.models); the role (policy or reward model) and `model.lora` come from the run's
config.yaml. The output loads in transformers and vLLM.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from rayrlhf.errors import InvalidInput

log = logging.getLogger(__name__)

OFFLINE_ROLES = {"sft": "policy", "rm": "reward", "dpo": "policy"}


def _role(cfg: Any) -> str:
    return "policy" if cfg.algorithm.is_online else OFFLINE_ROLES[cfg.algorithm.name]


def _checkpoint(out: Path, step: int | None) -> Path:
    from rayrlhf.orchestrator.checkpoint import latest_checkpoint

    root = out / "checkpoints"
    if step is None:
        folder = latest_checkpoint(root)
        if folder is None:
            raise InvalidInput(f"{out} has neither final/ nor a checkpoint to export")
        return folder
    folder = root / f"step_{step}"
    if not (folder / "orchestrator.json").is_file():
        have = sorted(int(p.name.removeprefix("step_")) for p in root.glob("step_*") if p.name.removeprefix("step_").isdigit())
        raise InvalidInput(f"--step {step}: {out} has no complete checkpoint step_{step} (it has steps {have or 'none'})")
    return folder


def checkpoint_state(folder: Path, adapter_only: bool) -> dict[str, torch.Tensor]:
    """The trained weights of one DeepSpeed checkpoint folder (`<step>/<role>`, tag `state`) in float32, under the
    trainer's in-memory names without its wrapper prefix; for a LoRA run the adapter's tensors only."""
    tag = folder / "state"
    if any(tag.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="state", exclude_frozen_parameters=adapter_only)
    else:  # ZeRO-0: the module's own state dict (DeepSpeed writes it with pickled metadata beside the tensors)
        state = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    out = {k.removeprefix("hf."): v.float() if v.is_floating_point() else v for k, v in state.items()}
    if adapter_only:
        out = {k: v for k, v in out.items() if ".lora_" in k or ".modules_to_save." in k}
    return out


def _load_base(path: str, role: str, dtype: str, trust: bool) -> torch.nn.Module:
    from rayrlhf.models.loading import load_policy, load_reward_model

    return (load_policy if role == "policy" else load_reward_model)(path, dtype, trust)


def _save(model: Any, dest: Path, base: str, trust: bool) -> None:
    from rayrlhf.models.loading import load_tokenizer

    model.save_pretrained(str(dest))
    (dest / "README.md").unlink(missing_ok=True)  # peft's blank model card
    load_tokenizer(base, trust).save_pretrained(str(dest))


def export(output_dir: str | Path, step: int | None = None, merge: bool = False, dest: str | Path | None = None) -> Path:
    """Write a run's weights as a Hugging Face model (see the module docstring); returns the folder written."""
    from rayrlhf.config import load_config
    from rayrlhf.models.lora import apply_lora, lora_spec, strip_adapter_name
    from rayrlhf.models.tiny import resolve_model_path

    out = Path(output_dir)
    if not (out / "config.yaml").is_file():
        raise InvalidInput(f"{out} is not a run's output_dir (no config.yaml)")
    cfg = load_config(out / "config.yaml")
    role, lora, trust = _role(cfg), cfg.model.lora, cfg.model.trust_remote_code
    if merge and lora is None:
        raise InvalidInput(f"--merge merges a LoRA adapter, and {out} trained the whole model (model.lora is null)")
    base = resolve_model_path(cfg.model.policy, out / ".models", cfg.seed)
    final = out / "final"
    from_final = step is None and final.is_dir()
    if from_final and not merge:
        what = "the adapter in peft's format" if lora else "the model in Hugging Face format"
        raise InvalidInput(f"{final} already holds {what}; pass --step N for a checkpoint" + (", or --merge" if lora else ""))
    folder = None if from_final else _checkpoint(out, step)
    label = folder.name if folder is not None else "final"
    if dest is None:
        dest = out / "merged" if from_final else out / "export" / (label + ("-merged" if merge else ""))
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise InvalidInput(f"{dest} exists and is not empty; remove it or choose another folder with --out")

    model = _load_base(base, role, cfg.model.dtype, trust)
    if from_final:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(final)).merge_and_unload()
    else:
        state = checkpoint_state(folder / role, adapter_only=lora is not None)
        if lora is None:
            model.load_state_dict(state, strict=True)
        else:
            from peft import set_peft_model_state_dict

            model = apply_lora(model, lora_spec(lora), role, base)
            files = {strip_adapter_name("base_model.model." + k): v for k, v in state.items()}
            result = set_peft_model_state_dict(model, files)
            if getattr(result, "unexpected_keys", None):
                raise RuntimeError(f"checkpoint {folder} holds adapter tensors the model has no place for: "
                                   f"{result.unexpected_keys[:4]}")
            if merge:
                model = model.merge_and_unload()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        _save(model, dest, base, trust)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    log.info("exported %s of %s to %s", label, out, dest)
    return dest

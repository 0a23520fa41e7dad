"""LoRA adapters (peft) on the models rayrlhf trains: which layers get one, and the adapter's tensors by name.

`model.lora` trains a low-rank update ΔW = s·B·A (s = alpha / rank) beside every targeted linear
layer while the base weights stay frozen; only A and B have gradients and optimizer state.
Three views of the same model are named here, each in the *checkpoint* names the rest of the
project uses:

- the **adapter** in peft's file format (`base_model.model.<layer>.lora_A.weight`), which
  `final/` holds and `rayrlhf export` reads;
- the adapter as a vLLM engine receives it: the same names, with the scaling s multiplied into
  lora_B (vLLM folds it in the same way when it loads an adapter, so an engine given an adapter
  with scaling 1 holds exactly the bytes that were sent: the checksums of a sync compare);
- the **merged** weights W + s·B·A under the base model's own names, for an engine that takes
  full weights (`model.lora.sync: merged`) and for `rayrlhf export --merge`.

`all-linear` targets every `nn.Linear` of the decoder except the output layer, a classification
head and mixture-of-experts routers; fused expert weights (3-D parameters in transformers 5) are
not linear layers and stay frozen, which is also what vLLM can serve (see docs/design.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

ALL_LINEAR = "all-linear"
ADAPTER = "default"  # peft's adapter name inside the model; the files carry no adapter name
PEFT_PREFIX = "base_model.model."
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.32's allowed max_lora_rank values
HEAD_NAMES = ("score", "classifier")
ROUTER_NAMES = ("gate", "router")


@dataclass(frozen=True)
class LoraSpec:
    """What the trainer ranks and the engines need of `model.lora` (plain values: it crosses to Ray actors)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = ALL_LINEAR
    sync: str = "adapter"  # adapter | merged (auto is resolved before any actor starts)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def lora_spec(cfg: Any) -> LoraSpec | None:
    """The LoraSpec of a `model.lora` config section (None: no LoRA)."""
    if cfg is None:
        return None
    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else tuple(cfg.target_modules)
    return LoraSpec(cfg.rank, float(cfg.alpha), cfg.dropout, targets, cfg.sync)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds `rank` (ValueError past its largest)."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"model.lora.rank = {rank} is more than vLLM serves ({VLLM_LORA_RANKS[-1]})")


def _has_experts(module: torch.nn.Module) -> bool:
    return any(name == "experts" or name.endswith("experts") for name, _ in module.named_children())


def target_module_names(model: torch.nn.Module, target_modules: str | tuple[str, ...] | list[str]) -> list[str]:
    """The layer names (last name component, peft's suffix match) that get an adapter.

    `all-linear`: every `nn.Linear` except the output layer, a classification head (`score`,
    `classifier`) and an MoE block's router; a list is checked: each entry must name at least one
    `nn.Linear`, else ValueError naming it. Works on a model built on the meta device."""
    linear: dict[str, str] = {}  # full name -> last component
    excluded: set[str] = set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linear[name] = name.rpartition(".")[2]
            if module is output or linear[name] in HEAD_NAMES and name.count(".") == 0:
                excluded.add(name)
        if _has_experts(module):
            for child, sub in module.named_children():
                if child in ROUTER_NAMES and isinstance(sub, torch.nn.Linear):
                    excluded.add(f"{name}.{child}" if name else child)
    if isinstance(target_modules, str):
        if target_modules != ALL_LINEAR:
            raise ValueError(f"model.lora.target_modules: {target_modules!r} is neither {ALL_LINEAR!r} nor a list of layer names")
        wanted = sorted({short for name, short in linear.items() if name not in excluded})
        if not wanted:
            raise ValueError("model.lora.target_modules: all-linear found no linear layer to adapt in this model")
        return wanted
    wanted = list(dict.fromkeys(target_modules))
    for entry in wanted:
        if not any(n == entry or n.endswith("." + entry) for n in linear if n not in excluded):
            shown = sorted({s for n, s in linear.items() if n not in excluded})
            raise ValueError(f"model.lora.target_modules: {entry!r} names no linear layer of this model; its linear "
                             f"layers are {shown}")
    return wanted


def meta_model(path: str, trust_remote_code: bool = False, role: str = "policy") -> torch.nn.Module:
    """The model's module tree without weights (on the meta device): enough to resolve target modules."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    auto = AutoModelForCausalLM if role == "policy" else AutoModelForSequenceClassification
    if role != "policy":
        config.num_labels = 1
    with torch.device("meta"):
        return auto.from_config(config, trust_remote_code=trust_remote_code)


def peft_config(spec: LoraSpec, targets: list[str], role: str = "policy", base: str | None = None) -> Any:
    """peft's LoraConfig for `spec` with its targets resolved (a reward model's score head trains whole)."""
    from peft import LoraConfig

    return LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(targets), bias="none",
        task_type="CAUSAL_LM" if role == "policy" else "SEQ_CLS", base_model_name_or_path=base,
    )


def apply_lora(model: torch.nn.Module, spec: LoraSpec, role: str = "policy", base: str | None = None) -> Any:
    """Wrap `model` with a fresh adapter (B = 0: the wrapped model computes exactly what the base does);
    every base weight is frozen, the adapter (and a reward model's score head) trains."""
    from peft import get_peft_model

    return get_peft_model(model, peft_config(spec, target_module_names(model, spec.target_modules), role, base))


def lora_layers(model: torch.nn.Module) -> dict[str, Any]:
    """{module name: peft LoRA layer} of a model with adapters injected (names as in `model`)."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def adapter_name(layer: str, part: str) -> str:
    """The file name of a LoRA tensor: `base_model.model.<layer>.<lora_A|lora_B>.weight`."""
    return f"{PEFT_PREFIX}{layer}.{part}.weight"


def strip_adapter_name(name: str) -> str:
    """An in-memory adapter parameter name as peft's files write it: `q_proj.lora_A.default.weight` is
    `q_proj.lora_A.weight`, a module trained whole (`score.modules_to_save.default.weight`) is `score.weight`."""
    name = name.replace(f".modules_to_save.{ADAPTER}.", ".")
    return re.sub(rf"\.(lora_A|lora_B)\.{ADAPTER}\.", r".\1.", name)


@dataclass
class Unit:
    """Weights gathered and produced together: `params` must be materialised (ZeRO-3) while `produce` runs;
    it returns {in-memory name: tensor}. `shapes` gives the same names' shapes without materialising."""

    params: list[torch.nn.Parameter]
    produce: Callable[[], dict[str, torch.Tensor]]
    shapes: Callable[[], dict[str, tuple[tuple[int, ...], torch.dtype]]] = field(default=lambda: {})


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(t, "ds_shape", t.shape))


def adapter_units(model: torch.nn.Module, engine_form: bool) -> Iterator[Unit]:
    """The adapter, one LoRA layer at a time, under its file names; `engine_form` multiplies each lora_B by
    its layer's scaling (what a vLLM engine given scaling 1 holds, see the module docstring)."""
    for name, layer in lora_layers(model).items():
        if ADAPTER not in layer.lora_A:
            continue
        a, b, s = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, float(layer.scaling[ADAPTER])

        def produce(name=name, a=a, b=b, s=s) -> dict[str, torch.Tensor]:
            b_out = b.detach() * s if engine_form else b.detach()
            return {adapter_name(name, "lora_A"): a.detach(), adapter_name(name, "lora_B"): b_out}

        def shapes(name=name, a=a, b=b) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
            return {adapter_name(name, "lora_A"): (_shape(a), a.dtype), adapter_name(name, "lora_B"): (_shape(b), b.dtype)}

        yield Unit([a, b], produce, shapes)


def saved_units(model: torch.nn.Module) -> Iterator[Unit]:
    """Every trainable tensor of the adapter in peft's file names: the LoRA pairs and modules trained whole
    (a reward model's score head: `base_model.model.score.weight`)."""
    yield from adapter_units(model, engine_form=False)
    for name, param in model.named_parameters():
        if param.requires_grad and ".modules_to_save." in name:
            file_name = PEFT_PREFIX + name.replace(f".modules_to_save.{ADAPTER}.", ".")
            yield Unit([param], lambda p=param, n=file_name: {n: p.detach()},
                       lambda p=param, n=file_name: {n: (_shape(p), p.dtype)})


def merged_units(model: torch.nn.Module) -> Iterator[tuple[str, Unit]]:
    """The model's full weights with every adapter merged (W + s·B·A, in float32 then cast back), under the base
    model's in-memory names, module by module (`hf_layout.module_weights` order): (module prefix, unit). The merge
    uses the adapter's current values; a module trained whole (modules_to_save) replaces its original."""
    from rayrlhf.models.hf_layout import module_weights

    layers = lora_layers(model)
    wrappers = {name: m for name, m in model.named_modules() if hasattr(m, "modules_to_save") and hasattr(m, "original_module")}

    def owner(module_name: str) -> tuple[str, str] | None:
        for name in layers:
            if module_name == name + ".base_layer":
                return name, "base"
            if module_name.startswith(name + "."):
                return name, "adapter"
        for name in wrappers:
            if module_name.startswith(name + ".original_module"):
                return name, "original"
            if module_name.startswith(name + f".modules_to_save.{ADAPTER}"):
                return name, "trained"
            if module_name.startswith(name + "."):
                return name, "adapter"
        return None

    for entry in module_weights(model):
        module_name = entry.prefix[:-1]
        found = owner(module_name)
        own = list(entry.params) + list(entry.buffers)
        if found is None:
            yield entry.prefix, Unit([p for _, p in entry.params],
                                     lambda own=own, prefix=entry.prefix: {prefix + n: t.detach() for n, t in own},
                                     lambda own=own, prefix=entry.prefix: {prefix + n: (_shape(t), t.dtype) for n, t in own})
            continue
        name, kind = found
        if kind in ("adapter", "original"):
            continue
        if kind == "trained":
            prefix = name + module_name.removeprefix(name + f".modules_to_save.{ADAPTER}") + "."
            yield prefix, Unit([p for _, p in entry.params],
                               lambda own=own, prefix=prefix: {prefix + n: t.detach() for n, t in own},
                               lambda own=own, prefix=prefix: {prefix + n: (_shape(t), t.dtype) for n, t in own})
            continue
        layer, prefix = layers[name], name + "."
        extra = [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight] if ADAPTER in layer.lora_A else []

        def produce(own=own, prefix=prefix, layer=layer) -> dict[str, torch.Tensor]:
            out = {prefix + n: t.detach() for n, t in own}
            if ADAPTER in layer.lora_A and not layer.merged:
                weight = out[prefix + "weight"]
                merged = weight.float() + layer.get_delta_weight(ADAPTER).float()
                out[prefix + "weight"] = merged.to(weight.dtype)
            return out

        yield prefix, Unit([p for _, p in entry.params] + extra, produce,
                           lambda own=own, prefix=prefix: {prefix + n: (_shape(t), t.dtype) for n, t in own})


def engine_adapter_config(rank: int, targets: list[str]) -> dict[str, Any]:
    """adapter_config.json of an adapter in engine form (scaling already in lora_B: alpha = rank)."""
    return {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(targets), "bias": "none",
            "lora_dropout": 0.0, "modules_to_save": None, "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
            "task_type": "CAUSAL_LM"}

"""A transformers model's weights in its *checkpoint* format, module by module, with its tied aliases.

What travels to the rollout engines, what `final/` holds and what a verification compares is
the checkpoint format: the names and layout of the model's `model.safetensors`, which every
engine loads. transformers 5 may keep weights in memory in another layout (mixture-of-experts
models fuse their experts into one tensor per layer); `revert_weight_conversion` is its own
inverse of that, applied here one module at a time so that a ZeRO-3 trainer never gathers more
than one module.

Tied weights are found by what the model really shares: a parameter reached under a second name
(`lm_head.weight` when it is `model.embed_tokens.weight`) is an *alias*. It travels once under
its first name; the alias is announced so that an engine holding a separate copy loads it too,
and a verification can compare it byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class ModuleWeights:
    """One module's own weights: parameters first reached here, persistent buffers, and aliases."""

    prefix: str
    params: list[tuple[str, torch.nn.Parameter]] = field(default_factory=list)
    buffers: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    aliases: list[tuple[str, str]] = field(default_factory=list)  # (alias full name, canonical full name)


def module_weights(model: torch.nn.Module) -> Iterator[ModuleWeights]:
    """Every module that owns weights, in `named_modules` order (the order weights travel in)."""
    first: dict[int, str] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        entry = ModuleWeights(prefix)
        for name, param in module.named_parameters(recurse=False):
            if id(param) in first:
                entry.aliases.append((prefix + name, first[id(param)]))
            else:
                first[id(param)] = prefix + name
                entry.params.append((name, param))
        entry.buffers = [(n, b) for n, b in module.named_buffers(recurse=False)
                         if b is not None and n not in module._non_persistent_buffers_set]
        if entry.params or entry.buffers or entry.aliases:
            yield entry


def checkpoint_format(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` (in-memory names, one module's worth) renamed and reshaped into the checkpoint format."""
    if not tensors:
        return tensors
    from transformers.core_model_loading import revert_weight_conversion

    return dict(revert_weight_conversion(model, dict(tensors)))


def checkpoint_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{alias: canonical} in checkpoint names (tied parameters are never converted, only renamed)."""
    out = {}
    for entry in module_weights(model):
        for alias, canonical in entry.aliases:
            [alias_ck] = checkpoint_format(model, {alias: torch.empty(0)})
            [canonical_ck] = checkpoint_format(model, {canonical: torch.empty(0)})
            out[alias_ck] = canonical_ck
    return out


def checkpoint_state(model: torch.nn.Module, aliases: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) of a plain (not ZeRO-sharded) model; tied aliases too when asked."""
    seen: dict[str, torch.Tensor] = {}
    for entry in module_weights(model):
        own = {entry.prefix + n: t.detach() for n, t in entry.params + entry.buffers}
        for name, tensor in checkpoint_format(model, own).items():
            seen[name] = tensor
            yield name, tensor
    if aliases:
        for alias, canonical in checkpoint_aliases(model).items():
            yield alias, seen[canonical]


def checkpoint_renames(model: torch.nn.Module) -> dict[str, str] | None:
    """{checkpoint name: in-memory name} of every weight when the checkpoint format differs from the model's
    memory by names only (GPT-NeoX keeps `embed_out` as `lm_head`); None when a conversion merges, splits or
    reshapes tensors (fused experts), so a checkpoint tensor cannot be copied into one in-memory tensor.

    A renaming passes each tensor through as the same object, a real conversion makes new ones: that is
    what tells them apart (works on a meta-device model, with no weights).
    """
    renames: dict[str, str] = {}
    for entry in module_weights(model):
        own = {entry.prefix + n: t for n, t in entry.params + entry.buffers}
        converted = checkpoint_format(model, own)
        origin = {id(t): name for name, t in own.items()}
        if len(converted) != len(own) or any(id(t) not in origin for t in converted.values()):
            return None
        renames.update({name: origin[id(t)] for name, t in converted.items()})
    return renames


"""Build a trainer's model already partitioned over its ZeRO-3 group, then fill it from the checkpoint one
module at a time.

Loading the whole model on every rank and letting DeepSpeed partition it afterwards costs each rank the
full model in host memory however many ranks share it. transformers' own ZeRO-3 path (`HfDeepSpeedConfig`
before `from_pretrained`) builds partitioned but reads the whole state dict on every rank. Here:

* every parameter is created partitioned (`deepspeed.zero.Init`), with no random initialisation;
* module by module, all ranks gather the module's parameters, rank 0 copies that module's tensors from
  the safetensors files into them, and leaving the gather broadcasts rank 0's values and repartitions;
* parameters the checkpoint lacks (a new critic or reward head) are initialised by the model's own
  `_init_weights` on rank 0 (seeded by the caller) and broadcast the same way.

So a rank holds its partition plus one gathered module (rank 0 also that module's tensors as read).
Names and layouts are transformers' own: `hf_layout.checkpoint_format` of the gathered tensors names the
checkpoint tensors a module needs, usually as views into its parameters (a rename passes a tensor through:
GPT-NeoX's `embed_out`), into which the file's values are copied; where the layout is converted (fused
experts), transformers' own forward conversion of that module's tensors builds the parameters.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from rayrlhf.models.hf_layout import checkpoint_format, module_weights
from rayrlhf.models.loading import disable_dropout, resolve_dtype, role_config

log = logging.getLogger(__name__)


class NotPartitionable(RuntimeError):
    """This checkpoint cannot be streamed into a partitioned model (no safetensors, a converted module it does not
    hold whole); raised by every rank alike, so the caller can build the model the ordinary way instead."""


def checkpoint_index(path: str | Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of a model directory (or a hub id in the local cache)."""
    root = Path(path)
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(str(path), allow_patterns=["*.safetensors", "*.json"]))
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return {name: root / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = root / "model.safetensors"
    if not single.is_file():
        raise NotPartitionable(f"{path} has no safetensors checkpoint")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return dict.fromkeys(f.keys(), single)


def _read(files: dict[str, Path], names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The named tensors, each file opened for this call only (its mapped pages go when it closes)."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for file, wanted in by_file.items():
        with safe_open(str(file), "pt") as f:
            for name in wanted:
                yield name, f.get_tensor(name)


def _shapes(files: dict[str, Path], names: list[str]) -> dict[str, tuple[int, ...]]:
    """The named tensors' shapes, from the files' headers (read by every rank: cheap, and any mismatch is
    then refused by all ranks alike, before the module's collectives diverge)."""
    from safetensors import safe_open

    out = {}
    for file in {files[n] for n in names}:
        with safe_open(str(file), "pt") as f:
            out.update({n: tuple(f.get_slice(n).get_shape()) for n in names if files[n] == file})
    return out


def _stored_name(name: str, files: dict[str, Path], prefix: str) -> str | None:
    """The checkpoint's key for `name`, with or without the base model's prefix (as transformers accepts)."""
    for candidate in (name, name.removeprefix(f"{prefix}."), f"{prefix}.{name}"):
        if candidate in files:
            return candidate
    return None


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@contextmanager
def _gathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """All ranks see the full `params`; rank 0's values are broadcast and repartitioned on exit."""
    import deepspeed

    if not params:
        yield
        return
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield


def _forward_conversion(model: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (one module's) in the model's in-memory names and layout: transformers' own ZeRO-3
    loading step (renamings and converters such as fused experts), applied to a module's worth at a time."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.integrations.deepspeed import _apply_weight_conversions_to_state_dict

    return _apply_weight_conversions_to_state_dict(model, dict(tensors), get_model_conversion_mapping(model))


def _fill_module(model: Any, entry: Any, files: dict[str, Path], rank: int, path: str) -> tuple[int, int]:
    """Fill one gathered module (every rank calls it, rank 0 reads and writes); returns (tensors read, 1 when the
    model's own init ran). Every decision that raises is taken from shapes and names all ranks see alike."""
    own = {entry.prefix + n: p.data for n, p in entry.params}
    if not own:
        return 0, 0
    wanted = checkpoint_format(model, own)  # checkpoint name -> tensor of the checkpoint's shape
    storages = {_storage(t) for t in own.values()}
    views = all(_storage(t) in storages for t in wanted.values())  # renamed or cut in place: copy into them
    stored = {name: _stored_name(name, files, model.base_model_prefix) for name in wanted}
    missing = [name for name, key in stored.items() if key is None]
    if missing and not views:
        raise NotPartitionable(f"{entry.prefix}: {missing[0]} is not in the checkpoint, and the module's layout is "
                               "converted from it")
    present = {key: name for name, key in stored.items() if key is not None}
    for key, shape in _shapes(files, list(present)).items():
        if shape != tuple(wanted[present[key]].shape):
            raise ValueError(f"{path}: {key} has shape {shape}, the model {tuple(wanted[present[key]].shape)}")
    if rank == 0:
        if missing:  # a module the checkpoint does not hold whole (a new head): the model's own init first
            model._init_weights(model.get_submodule(entry.prefix.removesuffix(".")))
        tensors = dict(_read(files, list(present)))
        if views:
            for key, tensor in tensors.items():
                wanted[present[key]].copy_(tensor)
        else:  # fused experts and the like: converted forward, as transformers loads them
            converted = _forward_conversion(model, {present[k]: t for k, t in tensors.items()})
            absent = sorted(set(own) - set(converted))
            if absent:
                raise RuntimeError(f"{path}: converting {entry.prefix} from the checkpoint gave no {absent[0]}")
            for name, tensor in own.items():
                tensor.copy_(converted[name])
        del tensors
    return len(present), int(bool(missing))


def load_partitioned(
    role: str, path: str | Path, dtype: str, trust_remote_code: bool, no_dropout: bool, ds_config: dict[str, Any],
) -> Any:
    """The role's model (as `loading.load_policy` / `load_critic` / `load_reward_model` build it), created
    partitioned over the ZeRO-3 group of `ds_config` and filled from `path` one module at a time.

    All ranks of the group call it together. Raises NotPartitionable, on every rank alike, when the checkpoint
    cannot be streamed this way (the caller then loads the whole model instead).
    """
    import deepspeed
    from transformers.initialization import no_init_weights

    files = checkpoint_index(path)
    auto_class, config = role_config("policy" if role == "policy" else "reward", path, trust_remote_code)
    # Define the model's classes before zero.Init: it wraps the __init__ of classes created inside it and puts
    # back the undecorated one on exit, dropping transformers' own wrappers (MoE experts lose their `config`).
    with torch.device("meta"):
        auto_class.from_config(config, trust_remote_code=trust_remote_code)
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False):
        model = auto_class.from_config(config, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code)
    model.tie_weights()
    rank = torch.distributed.get_rank()
    loaded = initialised = 0
    with torch.no_grad():
        for entry in module_weights(model):
            with _gathered([p for _, p in entry.params]):
                n_loaded, init = _fill_module(model, entry, files, rank, str(path))
            loaded, initialised = loaded + n_loaded, initialised + init
            # persistent buffers are not partitioned: every rank reads its own
            buffers = {entry.prefix + n: b for n, b in entry.buffers}
            keys = {name: _stored_name(name, files, model.base_model_prefix) for name in buffers}
            for key, tensor in _read(files, [k for k in keys.values() if k is not None]):
                buffers[next(n for n, k in keys.items() if k == key)].copy_(tensor)
    log.info("%s built partitioned over %d rank(s): %d tensor(s) streamed from %s, %d module(s) initialised",
             role, torch.distributed.get_world_size(), loaded, path, initialised)
    return disable_dropout(model) if no_dropout else model

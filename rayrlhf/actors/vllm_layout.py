"""vLLM's weights seen in the trainer's terms: checkpoint names, regions and real kernel values.

A verified weight sync compares, tensor by tensor, what each rollout engine computes with to
what the trainer holds. The trainer speaks the Hugging Face *checkpoint* format (the names
and layout of `model.safetensors`); vLLM stores weights its own way. This module undoes
vLLM's layout, per engine rank, into pieces ``(checkpoint name, region, tensor)``:

* **names**: vLLM's loader renames checkpoint names (prefixes, `gpt_neox.` -> `model.`, transformers'
  own renamings such as `embed_out` -> `lm_head`, stacked q/k/v -> `qkv_proj` shard "q"). Rather than a
  table per architecture, each of the trainer's checkpoint names is put through the model's own
  `hf_to_vllm_mapper` -- what `load_weights` does with it -- and the result is inverted;
* **fused projections** (`qkv_proj`, `gate_up_proj`) are split into the checkpoint's
  `q/k/v_proj` and `gate/up_proj`, or kept fused when the checkpoint itself fuses them (Phi-3);
* **tensor parallelism**: a rank holds a slice of each sharded tensor. A piece's region is
  the slice of the full checkpoint tensor it holds, one ``(start, stop)`` per dimension, so
  the trainer hashes exactly the matching slice. Column-parallel layers are cut along their
  output rows (q/k/v per head, k/v heads replicated when there are fewer than ranks), row-
  parallel ones along their input columns, vocabularies by the rank's vocabulary range with
  the padding rows dropped;
* **mixture of experts**: the fused `w13`/`w2` expert tensors become the checkpoint's
  per-expert `gate/up/down` (or `w1/w3/w2`) weights, named by the layer's own expert mapping;
* **real kernel values**: on CPU, vLLM repacks linear weights for oneDNN / sgl-kernel and may
  drop the dense copy. A linear layer is read back by feeding its own kernel an identity
  matrix (which returns Wᵀ exactly); where the dense weight is kept beside a packed copy
  (embeddings, the lm_head) the read-back must equal it, or the read-back is what gets hashed,
  so a stale packed copy fails the verification. Prepacked CPU expert weights are a fixed
  permutation of the checkpoint's, inverted through an index probe.

The reload helpers at the end work around two vLLM 0.32 CPU behaviours met on real models:
a tied lm_head keeps a packed copy of the embedding that a reload of `embed_tokens` does not
refresh, and a weight update skips the repacking of CPU MoE experts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from rayrlhf.actors.weights import Region, full_region

Piece = tuple[str, Region, torch.Tensor]

_PROBE_ROWS = 1024  # identity rows per kernel call when reading a packed weight back
_DEFAULT_PARTS = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
_MOE_PARAMS = ("w13_weight", "w2_weight")


def placed(shape: torch.Size | tuple[int, ...], dim: int, offset: int) -> Region:
    """The region of a tensor of `shape` that sits at `offset` along `dim` of a larger one."""
    return tuple((offset, offset + int(n)) if d == dim else (0, int(n)) for d, n in enumerate(shape))


# ------------------------------------------------------------------------------ kernel values
def _linear_readback(module: torch.nn.Module, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """Wᵀ through the layer's own CPU kernel: each output is one weight times 1 plus zeros (exact)."""
    cols = []
    with torch.no_grad():
        for start in range(0, in_features, _PROBE_ROWS):
            rows = min(_PROBE_ROWS, in_features - start)
            eye = torch.zeros(rows, in_features, dtype=dtype)
            eye[:, start : start + rows] = torch.eye(rows, dtype=dtype)
            cols.append(module.cpu_linear(eye, module.weight, None))
    return torch.cat(cols).t().contiguous().to(dtype)


def kernel_weight(module: torch.nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight a (CPU-repacked) linear layer computes with; `weight` itself elsewhere."""
    if not hasattr(module, "cpu_linear"):
        return weight
    if weight.numel():
        if weight.dim() != 2:
            return weight
        in_features = weight.shape[1]
    else:
        in_features = getattr(module, "input_size_per_partition", None) or getattr(module, "input_size", None)
        if in_features is None:
            raise NotImplementedError(f"cannot read back the repacked weight of {type(module).__name__}")
    readback = _linear_readback(module, int(in_features), weight.dtype if weight.numel() else dtype)
    if weight.numel() and readback.shape == weight.shape and torch.equal(readback, weight):
        return weight
    return readback  # the kernel computes with something else than the kept weight: hash what it uses


_PERMUTATIONS: dict[tuple[Any, ...], torch.Tensor] = {}


def _prepack_permutation(shape: tuple[int, ...], dtype: torch.dtype, isa: str) -> torch.Tensor:
    """Index map of vLLM's CPU expert prepack for one expert: packed.flat[i] = original.flat[perm[i]].

    The prepack is a fixed permutation of each expert's elements. It is found by prepacking
    index tensors, 8 bits at a time so the values are exact in any float dtype.
    """
    key = (shape, dtype, isa)
    if key not in _PERMUTATIONS:
        from vllm._custom_ops import cpu_prepack_moe_weight

        index = torch.arange(int(torch.Size(shape).numel()), dtype=torch.int64)
        perm = torch.zeros_like(index)
        for shift in (0, 8, 16, 24, 32):
            if index.numel() <= 1 << shift:
                break
            digits = ((index >> shift) & 255).to(dtype).reshape(1, *shape)
            perm |= cpu_prepack_moe_weight(digits, isa).reshape(-1).to(torch.int64) << shift
        if not torch.equal(perm.sort().values, index):
            raise NotImplementedError(f"vLLM's CPU expert prepack ({isa}, {dtype}) is not a permutation")
        _PERMUTATIONS[key] = perm
    return _PERMUTATIONS[key]


def _cpu_experts(module: torch.nn.Module) -> Any:
    """The CPU prepacking experts implementation of a vLLM MoE layer, or None."""
    kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
    experts = getattr(kernel, "fused_experts", None)
    if experts is None or type(experts).__module__.rsplit(".", 1)[-1] != "cpu_moe" or not hasattr(experts, "isa"):
        return None
    return None if getattr(experts, "_use_zentorch", False) else experts


def expert_weight(module: torch.nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """[E, N, K] expert weights in the plain layout (CPU prepacking undone)."""
    experts = _cpu_experts(module)
    if experts is None:
        return tensor
    perm = _prepack_permutation(tuple(tensor.shape[1:]), tensor.dtype, experts.isa)
    plain = torch.empty_like(tensor).reshape(tensor.shape[0], -1)
    plain[:, perm] = tensor.reshape(tensor.shape[0], -1)
    return plain.reshape(tensor.shape)


# ------------------------------------------------------------------------------- name mapping
def _tp(module: torch.nn.Module) -> tuple[int, int]:
    return int(getattr(module, "tp_rank", 0) or 0), int(getattr(module, "tp_size", 1) or 1)


def _fused_parts(module: torch.nn.Module, leaf: str, tensor: torch.Tensor) -> list[tuple[int, int, int]]:
    """[(rows in this rank's tensor, offset in the full part, full part size)] per fused part."""
    rank, size = _tp(module)
    if hasattr(module, "num_kv_head_replicas"):  # QKVParallelLinear: heads split, k/v replicated if few
        v_head = getattr(module, "v_head_size", module.head_size)
        q, kv, v = module.num_heads * module.head_size, module.num_kv_heads * module.head_size, module.num_kv_heads * v_head
        kv_index = rank // module.num_kv_head_replicas
        totals = (module.total_num_heads * module.head_size, module.total_num_kv_heads * module.head_size,
                  module.total_num_kv_heads * v_head)
        return [(q, rank * q, totals[0]), (kv, kv_index * kv, totals[1]), (v, kv_index * v, totals[2])]
    sizes = getattr(module, "output_sizes", None)
    if sizes is None:
        raise NotImplementedError(f"{leaf}: a fused layer without output_sizes")
    return [(n // size, rank * (n // size), n) for n in sizes]


def _num_parts(module: torch.nn.Module) -> int:
    return 3 if hasattr(module, "num_kv_head_replicas") else len(getattr(module, "output_sizes", ()) or ())


def _split_fused(
    module: torch.nn.Module, module_name: str, attr: str, tensor: torch.Tensor, parts: list[str], names: set[str],
    part_names: list[str] | None = None,
) -> list[Piece]:
    """The fused tensor's parts as checkpoint pieces: named `part_names` (the loader's own mapping, when it
    has one) or `<prefix><part>.<attr>` for `parts` (packed_modules_mapping), or kept fused (Phi-3)."""
    leaf = module_name.rpartition(".")[2]
    layout = _fused_parts(module, leaf, tensor)
    if sum(rows for rows, _, _ in layout) != tensor.shape[0]:
        raise NotImplementedError(f"{module_name}.{attr}: fused layout {layout} does not match shape {tuple(tensor.shape)}")
    chunks = tensor.split([rows for rows, _, _ in layout])
    fused = f"{module_name}.{attr}"
    if fused in names:  # the checkpoint keeps the projection fused (Phi-3): regions inside the fused tensor
        pieces, base = [], 0
        for chunk, (_, offset, total) in zip(chunks, layout, strict=True):
            pieces.append((fused, placed(chunk.shape, 0, base + offset), chunk))
            base += total
        return pieces
    if part_names is not None and len(part_names) == len(layout):
        split_names = part_names
    else:
        if len(parts) != len(layout):
            raise NotImplementedError(f"{fused}: fused layout {leaf}={parts} does not match {len(layout)} parts")
        prefix = module_name[: len(module_name) - len(leaf)]
        split_names = [f"{prefix}{part}.{attr}" for part in parts]
    return [(name, placed(chunk.shape, 0, offset), chunk)
            for name, chunk, (_, offset, _) in zip(split_names, chunks, layout, strict=True)]


def _expert_pieces(module: torch.nn.Module, attr: str, tensor: torch.Tensor, dtype: torch.dtype) -> list[Piece]:
    """Per-expert checkpoint weights of a vLLM MoE layer (`w13_weight` [E, 2I, H] or `w2_weight` [E, H, I])."""
    config = module.moe_config
    if getattr(module, "expert_map", None) is not None or getattr(config, "ep_size", 1) > 1:
        raise NotImplementedError("weight checksums of expert-parallel MoE layers")
    tensor = expert_weight(module, tensor).to(dtype)
    inter = config.intermediate_size_per_partition
    if attr == "w13_weight" and tensor.shape[1] != 2 * inter:
        raise NotImplementedError(f"{module.layer_name}: padded expert weights {tuple(tensor.shape)}")
    parent = module.layer_name[: -len("experts")] if module.layer_name.endswith("experts") else module.layer_name + "."
    offset = config.tp_rank * inter
    pieces = []
    for param_name, weight_name, expert, shard in module.get_expert_mapping(include_fused=False):
        if not attr.startswith(param_name.removeprefix("experts.")):
            continue
        name = f"{parent}{weight_name}{attr.removeprefix(param_name.removeprefix('experts.'))}"
        if shard == "w1":
            part, region = tensor[expert, :inter], placed((inter, tensor.shape[2]), 0, offset)
        elif shard == "w3":
            part, region = tensor[expert, inter:], placed((inter, tensor.shape[2]), 0, offset)
        else:
            part, region = tensor[expert], placed(tuple(tensor.shape[1:]), 1, offset)
        pieces.append((name, region, part))
    return pieces


Shard = str | int | None
_QKV_SHARDS = ("q", "k", "v")


def vllm_names(model: torch.nn.Module, names: set[str]) -> dict[tuple[str, Shard], str]:
    """{(vLLM parameter name, shard id or None): checkpoint name} for the trainer's checkpoint `names`.

    Derived from what the model's loader does with a checkpoint name: `hf_to_vllm_mapper`, the
    WeightsMapper `load_weights` applies (prefix/regex/substring renames, transformers' own renamings,
    stacked q/k/v or gate/up into a fused parameter with its shard id). Names the mapper drops (None)
    or a model without a mapper map to themselves, as its loader then uses the name as it comes.
    """
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    out: dict[tuple[str, Shard], str] = {}
    for name in sorted(names):
        if mapper is None:
            out.setdefault((name, None), name)
            continue
        for vllm_name, probe in mapper.apply([(name, torch.empty(0))]):  # a fresh probe: apply tags it with a shard id
            out.setdefault((vllm_name, getattr(probe, "shard_id", None)), name)
    return out


def _shard_id(module: torch.nn.Module, index: int) -> Shard:
    """The loader's shard id of a fused layer's `index`-th part: q/k/v for attention, 0, 1, ... otherwise."""
    return _QKV_SHARDS[index] if hasattr(module, "num_kv_head_replicas") and index < 3 else index


def checkpoint_pieces(model: torch.nn.Module, dtype: torch.dtype, names: set[str]) -> Iterator[Piece]:
    """Every weight of this engine rank as (checkpoint name, region of the full tensor, values).

    `names` are the trainer's checkpoint names: they decide whether a fused projection is
    reported split or fused, and engine names are translated back to them (`vllm_names`). A
    fused layer the mapping does not understand raises NotImplementedError naming it, and a
    parameter with no checkpoint name is reported under its vLLM name (the verification calls it
    unknown to the trainer), so an unsupported layout fails loudly instead of verifying nothing.
    """
    from vllm.model_executor.layers.linear import RowParallelLinear

    packed = {**_DEFAULT_PARTS, **dict(getattr(model, "packed_modules_mapping", None) or {})}
    back = vllm_names(model, names)
    params = list(model.named_parameters(remove_duplicate=False))
    reached: dict[int, list[str]] = {}
    for vllm_name, param in params:
        reached.setdefault(id(param), []).append(vllm_name)
    for vllm_name, param in params:
        # One parameter under several names: a tie the checkpoint knows (lm_head / embed_tokens) is
        # reported under each name it knows; an internal second path (Qwen3-MoE's router, also
        # reachable as experts.gate) is not reported again.
        paths = reached[id(param)]
        known = [n for n in paths if n in names or (n, None) in back]
        if len(paths) > 1 and vllm_name not in (known or paths[:1]):
            continue
        module_name, _, attr = vllm_name.rpartition(".")
        module = model.get_submodule(module_name)
        tensor = param.detach()
        if attr in _MOE_PARAMS and hasattr(module, "get_expert_mapping"):
            yield from _expert_pieces(module, attr, tensor, dtype)
            continue
        if attr == "weight":
            tensor = kernel_weight(module, tensor, dtype)
        if tensor.dtype != dtype:  # e.g. biases kept in float32 by the CPU sgl-kernel path
            tensor = tensor.to(dtype)
        rank, size = _tp(module)
        leaf = module_name.rpartition(".")[2]
        shard = getattr(module, "shard_indices", None)
        if shard is not None:  # vocabulary-parallel: this rank's rows, padding dropped
            rows = shard.org_vocab_end_index - shard.org_vocab_start_index
            pieces = [(vllm_name, placed((rows, *tensor.shape[1:]), 0, shard.org_vocab_start_index), tensor[:rows])]
        elif (leaf in packed or (vllm_name, 0) in back or (vllm_name, "q") in back) and (
                len(getattr(module, "output_sizes", ()) or ()) > 1 or hasattr(module, "num_kv_head_replicas")):
            parts = [back.get((vllm_name, _shard_id(module, i))) for i in range(_num_parts(module))]
            pieces = _split_fused(module, module_name, attr, tensor, packed.get(leaf, []), names,
                                  parts if all(parts) else None)
        elif size > 1 and isinstance(module, RowParallelLinear):
            pieces = [(vllm_name, placed(tensor.shape, 1, rank * tensor.shape[1]) if attr == "weight"
                       else full_region(tensor.shape), tensor)]
        elif size > 1 and getattr(param, "output_dim", None) == 0:
            pieces = [(vllm_name, placed(tensor.shape, 0, rank * tensor.shape[0]), tensor)]
        elif len(getattr(module, "output_sizes", ()) or ()) > 1:
            raise NotImplementedError(f"{vllm_name}: fused layer {leaf} with output sizes {module.output_sizes} "
                                      "and no known checkpoint parts")
        else:
            pieces = [(vllm_name, full_region(tensor.shape), tensor)]
        for hf_name, region, chunk in pieces:
            # an engine-side name the trainer does not know: the checkpoint name the loader put there, if any (a
            # name left unknown is reported by the verification as held by the engine, unknown to the trainer)
            yield (hf_name if hf_name in names else back.get((hf_name, None), hf_name)), region, chunk


# --------------------------------------------------------------------------------- reloading
def loadable_aliases(model: torch.nn.Module, aliases: dict[str, str]) -> dict[str, list[str]]:
    """{canonical: [alias, ...]} for tied names the engine holds as parameters of their own storage.

    Where the engine ties the two names to one parameter (or has no such parameter, like
    Gemma-2's vLLM model without an lm_head), the alias is not sent: loading the canonical
    tensor updates it. Where the engine keeps a separate copy, it must be loaded too.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    out: dict[str, list[str]] = {}
    for alias, canonical in aliases.items():
        mine, theirs = params.get(alias), params.get(canonical)
        if mine is not None and (theirs is None or mine.data_ptr() != theirs.data_ptr()):
            out.setdefault(canonical, []).append(alias)
    return out


def moe_layers_loaded(model: torch.nn.Module, names: list[str]) -> set[str]:
    """Names of the MoE layers (vLLM module names) that received expert weights in `names`."""
    layers = {getattr(m, "layer_name", n): n for n, m in model.named_modules()
              if hasattr(m, "get_expert_mapping") and hasattr(m, "w13_weight")}
    return {module for layer, module in layers.items() if any(n.startswith(layer + ".") for n in names)}


def repair_after_reload(model: torch.nn.Module, moe_reloaded: set[str]) -> None:
    """Bring the kernels that a vLLM 0.32 CPU reload leaves stale back in line with the weights.

    * MoE: a weight update copies the new expert weights in the plain layout into storage the
      CPU kernel reads as prepacked (vLLM skips the prepack on updates); prepack them in place.
    * Shared storage: a module whose kept weight shares storage with another module's parameter
      (a tied lm_head) was not reprocessed when that other module was; rebuild its CPU kernel.
    """
    for name in moe_reloaded:
        module = model.get_submodule(name)
        experts = _cpu_experts(module)
        if experts is None:
            continue
        from vllm._custom_ops import cpu_prepack_moe_weight

        for attr in _MOE_PARAMS:
            weight = getattr(module, attr)
            weight.data.copy_(cpu_prepack_moe_weight(weight.data.clone(), experts.isa))
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.numel():
                owners.setdefault(param.data_ptr(), []).append(module)
    shared = {id(m): m for group in owners.values() if len(group) > 1 for m in group}
    for module in shared.values():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.numel():
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            dispatch_cpu_unquantized_gemm(module, remove_weight=False)

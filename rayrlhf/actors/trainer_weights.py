"""What a trainer rank's weights look like from outside: streamed to the engines, checksummed, exported.

`TrainerRank` (actors/trainer.py) inherits these methods. Every one of them runs on all ranks of
a group together: under ZeRO-3 each unit of weights (a module, or a LoRA layer with its base) is
gathered with `GatheredParameters`, which every rank joins, and copied before the gather is
released, so at most one unit is ever materialised beyond the local shard. Only rank 0 yields.

Three kinds of weights (`rayrlhf.models.lora` names them):

- ``full``: the model in its checkpoint format; with a LoRA adapter, the base with the adapter
  merged in (W + s·B·A) under the base model's names: the merged sync, `export_hf(merged=True)`;
- ``adapter``: the LoRA tensors as an engine receives them (scaling folded into lora_B): the
  adapter sync and its checksums;
- ``saved``: the adapter in peft's file format, as `final/` holds it.

What the weight sync sends (`_sync_kind`) is the adapter when the policy trains one and
`model.lora.sync` is adapter, else the full weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import torch

from rayrlhf.actors.weights import Bucket, Region, bucketize, full_region, region_slice, tensor_checksum
from rayrlhf.models.hf_layout import checkpoint_aliases, checkpoint_format, module_weights
from rayrlhf.models.loading import resolve_dtype

log = logging.getLogger(__name__)

SHARD_BYTES = 2 * 1024**3
KINDS = ("full", "adapter", "saved")


def _cast(tensor: torch.Tensor, want: torch.dtype | None) -> torch.dtype:
    """The dtype a weight travels in: `want` for floating-point tensors, integer buffers as they are."""
    return want if want is not None and tensor.is_floating_point() else tensor.dtype


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


class WeightsMixin:
    """Weight streaming, checksums and export of one trainer rank (see the module docstring)."""

    engine: Any
    rank: int
    role: str
    settings: Any
    model_path: str
    device: Any
    weight_group: Any
    peft: Any

    # ---------------------------------------------------------------- units of weights

    def _sync_kind(self) -> str:
        lora = self.settings.lora
        return "adapter" if self.peft is not None and lora is not None and lora.sync == "adapter" else "full"

    def _units(self, kind: str) -> Iterator[Any]:
        """The `lora.Unit`s of `kind`, in stream order."""
        from rayrlhf.models import lora

        hf = self.engine.module.hf
        if kind == "adapter":
            yield from lora.adapter_units(hf, engine_form=True)
        elif kind == "saved":
            yield from lora.saved_units(hf)
        elif self.peft is not None:
            for _, unit in lora.merged_units(hf):
                yield unit
        else:
            for entry in module_weights(hf):
                own = entry.params + entry.buffers
                yield lora.Unit([p for _, p in entry.params],
                                lambda own=own, prefix=entry.prefix: {prefix + n: t.detach() for n, t in own},
                                lambda own=own, prefix=entry.prefix: {
                                    prefix + n: (tuple(getattr(t, "ds_shape", t.shape)), t.dtype) for n, t in own})

    def _tensors(self, kind: str, dtype: str | None, device: Any = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor on `device`) of every weight of `kind` (checkpoint names for ``full``), gathered unit
        by unit in lockstep on every rank; only rank 0 yields. Tied parameters appear once, under their first
        name, as in `save_pretrained`."""
        import deepspeed

        if kind not in KINDS:
            raise ValueError(f"unknown kind of weights {kind!r}; valid kinds are {list(KINDS)}")
        want = resolve_dtype(dtype) if dtype else None
        hf = self.engine.module.hf
        zero3 = self.engine.zero_optimization_stage() == 3
        for unit in self._units(kind):
            gathered = deepspeed.zero.GatheredParameters(unit.params) if zero3 and unit.params else None
            if gathered is not None:
                gathered.__enter__()
            try:  # copy inside the gather: the gathered storage is released (and reused) on exit
                out = {n: t.to(device=device, dtype=_cast(t, want), copy=zero3)
                       for n, t in unit.produce().items()} if self.rank == 0 else {}
            finally:
                if gathered is not None:
                    gathered.__exit__(None, None, None)
            yield from (checkpoint_format(hf, out) if kind == "full" else out).items()

    def _full_tensors(self, dtype: str | None, device: Any = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, full tensor) of every weight (a LoRA adapter merged in)."""
        return self._tensors("full", dtype, device)

    def _sync_tensors(self, dtype: str | None, device: Any = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        """What a weight sync sends: the adapter (engine form), or the full weights (through `_full_tensors`)."""
        if self._sync_kind() == "adapter":
            return self._tensors("adapter", dtype, device)
        return self._full_tensors(dtype, device)

    def _aliases(self, kind: str) -> dict[str, str]:
        return checkpoint_aliases(self.engine.module.hf) if kind == "full" else {}

    def weight_layout(self, dtype: str | None = None) -> tuple[list[tuple[str, tuple[int, ...], torch.dtype]], dict[str, str]]:
        """([(name, full shape, dtype)] of what a sync sends, in stream order, {tied alias: its name}), no gather."""
        want = resolve_dtype(dtype) if dtype else None
        hf, kind = self.engine.module.hf, self._sync_kind()
        meta = []
        for unit in self._units(kind):
            own = {n: torch.empty(shape, dtype=want if want is not None and dt.is_floating_point else dt, device="meta")
                   for n, (shape, dt) in unit.shapes().items()}
            meta += [(n, tuple(t.shape), t.dtype) for n, t in (checkpoint_format(hf, own) if kind == "full" else own).items()]
        return meta, self._aliases(kind)

    # ----- collective transport (see rayrlhf.actors.collective)

    def weight_group_address(self) -> tuple[str, int]:
        """This node's IP and a free port for the weight group's store (rank 0 hosts it)."""
        return ray.util.get_node_ip_address(), free_port()

    def init_weight_group(self, addr: str, port: int, world_size: int, group_name: str, timeout_s: float = 600.0) -> None:
        """Rank 0 hosts the store and joins the broadcast group as root 0; other ranks do nothing. Every wait of
        the group (joining, each broadcast) gives up after `timeout_s`."""
        from rayrlhf.actors.collective import WeightGroup

        self.destroy_weight_group()
        if self.rank == 0:
            self.weight_group = WeightGroup(addr, port, world_size, 0, group_name, self.device, timeout_s)

    def destroy_weight_group(self) -> None:
        group, self.weight_group = self.weight_group, None
        if group is not None:
            group.destroy()

    def broadcast_weights(self, dtype: str | None = None) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """Every rank joins the gathers; rank 0 broadcasts each tensor of the sync over the weight group.

        Returns what rank 0 sent ([] elsewhere); the workers receive in `weight_layout` order.
        """
        group = self.weight_group
        if self.rank == 0 and group is None:
            raise RuntimeError("broadcast_weights before init_weight_group")
        sent = []
        for name, tensor in self._sync_tensors(dtype, device=self.device):
            tensor = tensor.contiguous()
            group.broadcast(tensor)
            sent.append((name, tuple(tensor.shape), tensor.dtype))
        return sent

    def iter_weight_buckets(self, bucket_bytes: int, dtype: str | None = None, end_marker: bool = False) -> Iterator[Bucket | None]:
        """Stream what a sync sends as buckets (rank 0 yields; the others only join the gathers), then None
        when `end_marker` (so the driver can tell a complete stream from a broken one).

        Call with ``.options(num_returns="streaming")`` on every rank at once.
        """
        named = self._sync_tensors(dtype)
        if self.rank == 0:
            yield from bucketize(named, bucket_bytes)
            if end_marker:
                yield None
        else:
            for _ in named:
                pass

    def checksums(
        self, dtype: str | None = None, keys: list[tuple[str, Region]] | None = None
    ) -> dict[tuple[str, Region], str]:
        """Rank 0: {(name, region): checksum} of the pieces in `keys` (None: every whole tensor) of what a sync
        sends, tied aliases included; {} elsewhere. A region that does not fit its tensor is reported."""
        kind = self._sync_kind()
        wanted: dict[str, list[Region]] | None = None
        if keys is not None:
            wanted = {}
            for name, region in keys:
                wanted.setdefault(name, []).append(tuple(tuple(r) for r in region))
        alias_of: dict[str, list[str]] = {}
        for alias, canonical in self._aliases(kind).items():
            alias_of.setdefault(canonical, []).append(alias)
        out = {}
        for name, tensor in self._sync_tensors(dtype):
            for label in [name, *alias_of.get(name, [])]:
                regions = [full_region(tensor.shape)] if wanted is None else wanted.get(label, [])
                for region in regions:
                    try:
                        out[(label, region)] = tensor_checksum(region_slice(tensor, region))
                    except ValueError as exc:
                        out[(label, region)] = f"no such region: {exc}"
        return out

    # ---------------------------------------------------------------- export

    def export_hf(self, directory: str, dtype: str | None = None, merged: bool | None = None) -> None:
        """Rank 0 writes a Hugging Face directory: config, safetensors shards, tokenizer. With a LoRA adapter it
        is the adapter in peft's format (adapter_config.json, adapter_model.safetensors) unless `merged`."""
        from safetensors.torch import save_file

        adapter = self.peft is not None and not merged
        out = Path(directory)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        written: list[tuple[Path, list[str]]] = []
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        for name, tensor in self._tensors("saved", dtype) if adapter else self._full_tensors(dtype):
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > SHARD_BYTES and not adapter:  # an adapter is one file
                written.append(self._write_shard(out, len(written), shards.pop(), save_file))
                shards.append({})
                size = 0
            shards[-1][name] = tensor.contiguous()
            size += nbytes
        if self.rank == 0:
            written.append(self._write_shard(out, len(written), shards.pop(), save_file))
            if adapter:
                self._finish_adapter_export(out, written[0][0])
            else:
                self._finish_export(out, written, dtype)
        torch.distributed.barrier()

    @staticmethod
    def _write_shard(out: Path, index: int, tensors: dict[str, torch.Tensor], save_file: Any) -> tuple[Path, list[str]]:
        path = out / f"shard-{index:05d}.tmp"
        save_file(tensors, str(path), metadata={"format": "pt"})
        return path, list(tensors)

    def _finish_adapter_export(self, out: Path, shard: Path) -> None:
        import copy

        from transformers import AutoTokenizer

        shard.rename(out / "adapter_model.safetensors")
        config = copy.copy(self.peft.peft_config["default"])
        config.base_model_name_or_path, config.inference_mode = self.model_path, True
        config.save_pretrained(str(out))
        AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=self.settings.trust_remote_code).save_pretrained(out)
        log.info("exported the %s's LoRA adapter to %s", self.role, out)

    def _finish_export(self, out: Path, written: list[tuple[Path, list[str]]], dtype: str | None) -> None:
        import copy
        import json

        from transformers import AutoTokenizer

        n = len(written)
        weight_map: dict[str, str] = {}
        for i, (path, names) in enumerate(written):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(out / final)
            weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            total = sum((out / f).stat().st_size for f in set(weight_map.values()))
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hf = self.engine.module.hf
        config = copy.deepcopy(hf.config)
        config.architectures = [type(hf).__name__]
        config.use_cache = True
        first = next(iter(hf.parameters()))
        config.dtype = str(resolve_dtype(dtype) if dtype else first.dtype).removeprefix("torch.")
        config.save_pretrained(out)
        if getattr(hf, "generation_config", None) is not None and self.role == "policy":
            hf.generation_config.save_pretrained(out)
        AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=self.settings.trust_remote_code).save_pretrained(out)
        log.info("exported %s to %s (%d shard(s))", self.role, out, n)

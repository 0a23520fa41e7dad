"""vLLM's LoRA support as a rollout engine uses it: one adapter in service, replaced at every weight sync.

A policy that trains a LoRA adapter (`model.lora`, sync `adapter`) sends only the adapter to the engines:
the trainer's A and B with each layer's scaling already multiplied into B (`rayrlhf.models.lora`), so the
engine registers it with scaling 1 and holds exactly the bytes that were sent. `LoraSlot` writes each new
adapter to a local folder in peft's format and registers it with vLLM under a new id (vLLM loads adapters
from a path); every later request carries it. `rpc_lora_checksums` reads the adapter back from the LoRA
layers' stacked buffers, the values their kernels compute with, so a sync can be verified tensor by tensor
(`VLLMEngine.checksums`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from rayrlhf.actors.weights import Bucket, Region, full_region, tensor_checksum


def _held(module: Any, part: str, slices: int, shapes: list[tuple[int, int] | None]) -> list[Region | None]:
    """The region of each slice's full lora_A / lora_B this tensor-parallel rank holds: the layer's own slicing
    (`slice_lora_a` / `slice_lora_b`, what `set_lora` applies) run on tensors of element indices."""
    if getattr(module, "tp_size", 1) == 1:
        return [None if s is None else full_region(s) for s in shapes]
    probes = [None if s is None else torch.arange(s[0] * s[1], dtype=torch.float64).reshape(s) for s in shapes]
    cut = getattr(module, f"slice_lora_{part}")
    sliced = cut(probes) if slices > 1 else [cut(probes[0])]
    regions: list[Region | None] = []
    for shape, piece in zip(shapes, sliced, strict=True):
        if shape is None or piece is None:
            regions.append(None)
            continue
        rows, cols = (piece // shape[1]).long(), (piece % shape[1]).long()
        r0, c0 = int(rows.min()), int(cols.min())
        region = ((r0, r0 + piece.shape[0]), (c0, c0 + piece.shape[1]))
        expected = torch.arange(r0, r0 + piece.shape[0])[:, None] * shape[1] + torch.arange(c0, c0 + piece.shape[1])
        regions.append(region if torch.equal(piece.long(), expected) else None)  # not one block: not comparable
    return regions


def rpc_lora_checksums(worker: Any, lora_id: int, shapes: dict[str, tuple[int, ...]]) -> dict[tuple[str, Region], str]:
    """{(adapter file name, region): checksum} of adapter `lora_id` as this rank's vLLM LoRA layers compute with it:
    read back from the layers' stacked A/B buffers (its slot, one piece per packed slice), each piece named by the
    region of the full tensor it is (a tensor-parallel rank holds a slice of lora_B or of lora_A)."""
    from rayrlhf.models.lora import adapter_name

    manager = worker.model_runner.lora_manager._adapter_manager
    if lora_id not in manager.lora_index_to_id:
        return {}
    slot = manager.lora_index_to_id.index(lora_id)
    out = {}
    for module_name, module in manager.modules.items():
        if not hasattr(module, "lora_a_stacked"):
            continue
        parent, _, short = module_name.rpartition(".")
        children = manager.packed_modules_mapping.get(short, [short])
        slices = len(module.lora_a_stacked)
        if len(children) != slices:
            children = [short]
        layers = [f"{parent}.{child}" if parent else child for child in children]
        for part, stacked in (("a", module.lora_a_stacked), ("b", module.lora_b_stacked)):
            names = [adapter_name(layer, f"lora_{part.upper()}") for layer in layers]
            full = [tuple(shapes[n]) if n in shapes else None for n in names]
            for name, region, buffer in zip(names, _held(module, part, slices, full), stacked, strict=False):
                if region is None:
                    continue
                rows, cols = (b - a for a, b in region)
                out[(name, region)] = tensor_checksum(buffer[slot, 0, :rows, :cols])
    return out


class LoraSlot:
    """The LoRA adapter a vLLM engine samples with: each weight update brings a new one (the trainer's adapter
    with its scaling folded into lora_B, `rayrlhf.models.lora`), written to a local folder in peft's format and
    registered under a new id; later requests use it, the one before is dropped at the next update."""

    def __init__(self, model_path: str, spec: dict[str, Any], trust_remote_code: bool) -> None:
        import tempfile

        from rayrlhf.models.lora import ALL_LINEAR, meta_model, target_module_names

        targets = spec.get("target_modules", ALL_LINEAR)
        self.rank = int(spec["rank"])
        self.targets = target_module_names(meta_model(model_path, trust_remote_code),
                                           targets if isinstance(targets, str) else tuple(targets))
        self.root = Path(tempfile.mkdtemp(prefix="rayrlhf-lora-"))
        self.request: Any = None  # the LoRARequest of the adapter in service
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        self._next_id = 1
        self._old: list[Any] = []

    def engine_args(self) -> dict[str, Any]:
        from rayrlhf.models.lora import vllm_max_lora_rank

        return {"enable_lora": True, "max_lora_rank": vllm_max_lora_rank(self.rank), "max_loras": 1, "max_cpu_loras": 2,
                "lora_target_modules": list(self.targets)}

    def begin(self) -> None:
        self._tensors = {}

    def load(self, bucket: Bucket) -> None:
        for name, array in bucket:  # copied: the object store's arrays are read-only and go away
            self._tensors[name] = torch.from_numpy(np.array(array))

    def finish(self, dtype: torch.dtype) -> Any:
        import json

        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        from rayrlhf.models.lora import engine_adapter_config

        lora_id, self._next_id = self._next_id, self._next_id + 1
        folder = self.root / f"adapter-{lora_id}"
        folder.mkdir()
        tensors = {n: t.view(torch.bfloat16) if dtype == torch.bfloat16 and t.dtype == torch.int16 else t
                   for n, t in self._tensors.items()}
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(engine_adapter_config(self.rank, self.targets)))
        if self.request is not None:
            self._old.append(self.request)
        self.request = LoRARequest(f"rayrlhf-{lora_id}", lora_id, str(folder))
        self.shapes = {n: tuple(t.shape) for n, t in tensors.items()}
        self._tensors = {}
        return self.request

    def forget_old(self, engine: Any) -> None:
        """Drop adapters two updates old (the last one may still serve requests that started before)."""
        import shutil

        while len(self._old) > 1:
            old = self._old.pop(0)
            engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)

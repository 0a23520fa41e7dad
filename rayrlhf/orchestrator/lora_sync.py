"""Verifying a LoRA adapter sync by what the engines compute: their log-probs on a probe against the trainer's.

An adapter sync (`model.lora.sync: adapter`) is checked twice. `weight_sync.verify_weights` compares each
adapter tensor as the engine's LoRA layers hold it with the trainer's (naming any that differs); then,
since vLLM applies the adapter in its own kernels beside the base weights, every engine scores one probe
sequence with `prompt_logprobs` and its log-probs must be the trainer's (adapter on) within
`model.lora.probe_atol`. A gap with every tensor equal is an engine that computes with something else
than it was given (a LoRA kernel, a stale slot), which the tensor comparison alone would miss.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import torch

from rayrlhf.actors.types import GenerationRequest, SamplingSpec
from rayrlhf.actors.weight_sync import WeightSyncError
from rayrlhf.models.forward import pack_batch

log = logging.getLogger(__name__)

PROBE_TOKENS = 64
DEFAULT_ATOL = {"float32": 1e-3}  # 16-bit engines: 0.1 (their kernels round differently from the trainer's)
_probe_ids = itertools.count()  # request ids stay unique on a worker even after a probe that timed out


def probe_ids(prompts: Sequence[Sequence[int]], length: int = PROBE_TOKENS) -> list[int]:
    """A probe sequence of up to `length` tokens: the first training prompts, one after the other."""
    ids = [int(t) for p in prompts for t in p][:length]
    if len(ids) < 2:
        raise ValueError("the LoRA sync probe needs at least 2 tokens of training prompts")
    return ids


def probe_atol(configured: float | None, dtype: str) -> float:
    """`model.lora.probe_atol`, or its default for the engines' dtype."""
    return configured if configured is not None else DEFAULT_ATOL.get(dtype, 0.1)


def verify_adapter_logprobs(
    policy: Any, workers: Sequence[Any], ids: list[int], pad_id: int, atol: float, version: int,
    timeout_s: float | None = None,
) -> dict[int, tuple[str, str]]:
    """Raise WeightSyncError unless every worker that answers gives the probe the trainer's log-probs within
    `atol`; returns the workers that failed to answer (index -> (kind, message)), like `verify_weights`.
    The caller holds the policy group's lock (this calls the trainer)."""
    from rayrlhf.actors.health import classify
    from rayrlhf.orchestrator.workers import collect

    trainer = policy.forward_logprobs(pack_batch([ids[:1]], [ids[1:]], pad_id), temperature=1.0)["logp"][0]
    spec = SamplingSpec(n=1, temperature=1.0, max_new_tokens=1, seed=0, prompt_logprobs=True)
    failed: dict[int, tuple[str, str]] = {}
    for i, worker in enumerate(workers):
        try:
            [probe] = collect(worker, [GenerationRequest(f"lora-probe-v{version}-{next(_probe_ids)}", ids, spec)], timeout_s=timeout_s)
        except Exception as exc:  # noqa: BLE001 - blamed on the worker, as a failed sync would be
            failed[i] = (classify(exc), f"the LoRA probe failed: {type(exc).__name__}: {exc}"[:600])
            continue
        engine = torch.tensor(probe.prompt_logprobs or [], dtype=torch.float32)
        if engine.shape != trainer.shape:
            raise WeightSyncError(f"rollout worker {i}: the LoRA probe returned {engine.numel()} log-probs for "
                                  f"{trainer.numel()} tokens")
        gap = (engine - trainer).abs()
        if float(gap.max()) > atol:
            t = int(gap.argmax())
            raise WeightSyncError(
                f"rollout worker {i}: after the adapter sync of weight version {version} its log-probs on the probe differ "
                f"from the trainer's by up to {float(gap.max()):.3g} (token {t + 1} of {len(ids)}: engine "
                f"{float(engine[t]):.5f}, trainer {float(trainer[t]):.5f}; model.lora.probe_atol {atol:g}); after a "
                "verification of its adapter tensors this means the engine applies the adapter differently"
            )
        log.debug("LoRA probe v%d, worker %d: max log-prob gap %.2g", version, i, float(gap.max()))
    return failed

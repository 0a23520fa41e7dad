"""Generation engines behind one interface: vLLM (continuous batching) and transformers `generate`.

A rollout worker drives an engine with `add` / `step` and moves weights into it in buckets
named by their Hugging Face names. Both engines report the sampled token's log-prob under
the trainer's convention, log_softmax(logits / temperature), and fingerprint their weights
in the trainer's checkpoint names and regions, so a weight sync can be verified byte for byte.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from rayrlhf.actors.types import Completion, GenerationRequest, SamplingSpec
from rayrlhf.actors.weights import Bucket, Region, from_numpy, full_region, tensor_checksum

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What a rollout worker needs from a generation backend (not thread-safe: callers serialise)."""

    def add(self, request: GenerationRequest) -> None: ...
    def step(self) -> list[Completion]: ...
    def has_unfinished(self) -> bool: ...
    def num_unfinished(self) -> int: ...
    def reset_prefix_cache(self) -> None: ...
    def begin_weight_update(self, aliases: dict[str, str] | None = None) -> None: ...
    def load_weights(self, bucket: Bucket) -> None: ...
    def finish_weight_update(self) -> None: ...
    def checksums(self, names: list[str]) -> dict[tuple[str, Region], str]: ...

    dtype: torch.dtype  # the dtype the engine computes in, resolved where it runs


def _bucket_tensors(bucket: Bucket, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Zero-copy tensors of a bucket; int16 arrays carry bfloat16 bits for a bfloat16 model (weights.to_numpy)."""
    for name, array in bucket:
        bf16 = dtype == torch.bfloat16 and array.dtype == np.int16
        yield name, from_numpy(array, torch.bfloat16 if bf16 else torch.float32)  # non-bf16 target: no reinterpretation


# ---------------------------------------------------------------------------------------------
# vLLM
# ---------------------------------------------------------------------------------------------
# The functions below run inside every vLLM worker (one per tensor-parallel rank) through
# `collective_rpc(fn, args=...)`. With VLLM_ENABLE_V1_MULTIPROCESSING=0 and one worker they run
# in this process and the buckets pass by reference; with tensor parallelism the workers are
# separate processes and vLLM pickles the function and its arguments to each of them. They are
# module-level so that they pickle. Layout details live in `rayrlhf.actors.vllm_layout`.


def _rpc_begin_reload(worker: Any, aliases: dict[str, str]) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    from rayrlhf.actors.vllm_layout import loadable_aliases

    model = worker.get_model()
    # before the reload moves the parameters: which tied names this engine stores separately
    worker.rayrlhf_reload = {"aliases": loadable_aliases(model, aliases), "names": []}
    with set_current_vllm_config(worker.vllm_config):
        initialize_layerwise_reload(model)


def _rpc_load_bucket(worker: Any, bucket: Bucket) -> int:
    from vllm.config import set_current_vllm_config

    state = worker.rayrlhf_reload
    items = list(_bucket_tensors(bucket, worker.vllm_config.model_config.dtype))
    items += [(alias, t) for name, t in items for alias in state["aliases"].get(name, ())]
    state["names"].extend(name for name, _ in items)
    with set_current_vllm_config(worker.vllm_config):
        loaded = worker.get_model().load_weights(iter(items))
    return len(loaded or ())


def _rpc_finish_reload(worker: Any) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    from rayrlhf.actors.vllm_layout import moe_layers_loaded, repair_after_reload

    model = worker.get_model()
    with set_current_vllm_config(worker.vllm_config):
        finalize_layerwise_reload(model, worker.vllm_config.model_config)
    repair_after_reload(model, moe_layers_loaded(model, worker.rayrlhf_reload.pop("names")))


def _rpc_checksums(worker: Any, names: list[str]) -> dict[tuple[str, Region], str]:
    from rayrlhf.actors.vllm_layout import checkpoint_pieces

    dtype = worker.vllm_config.model_config.dtype
    return {(name, region): tensor_checksum(t) for name, region, t in checkpoint_pieces(worker.get_model(), dtype, set(names))}


def merge_rank_checksums(per_rank: list[dict[tuple[str, Region], str]]) -> dict[tuple[str, Region], str]:
    """One engine's checksums from its tensor-parallel ranks; a piece two ranks hold differently is marked."""
    merged: dict[tuple[str, Region], str] = {}
    for rank, sums in enumerate(per_rank):
        for key, value in sums.items():
            if merged.get(key, value) != value:
                value = f"ranks disagree (rank {rank}: {value})"
            merged[key] = value
    return merged


class VLLMEngine:
    """vLLM's `LLMEngine` (v1), run in this process, one engine request per sample.

    Log-probs: the engine is created with logprobs_mode="processed_logprobs", so the returned
    log-prob is log_softmax over the logits after temperature scaling and top-k/top-p masking,
    which equals the trainer's log_softmax(logits / T) whenever top_k and top_p are off (the
    RL default). With top-k/top-p on, it is renormalised over the kept tokens and so is at
    least the trainer's value (the two disagree by the log of the kept probability mass).
    At temperature 0 it is log_softmax(logits) (greedy, no scaling).
    """

    def __init__(
        self,
        model_path: str | Path,
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.2,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = True,
        trust_remote_code: bool = False,
        max_num_seqs: int | None = None,
        lora: dict[str, Any] | None = None,
    ) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process
        try:
            from vllm import EngineArgs
            from vllm.v1.engine.llm_engine import LLMEngine
        except ImportError as exc:
            raise RuntimeError(
                f"rollout.backend=vllm needs vLLM, which cannot be imported here ({exc}); "
                "install the [cpu] or [gpu] extra, or set rollout.backend=hf"
            ) from exc
        from rayrlhf.actors.vllm_lora import LoraSlot
        from rayrlhf.models.loading import resolve_dtype

        self.dtype = resolve_dtype(dtype)
        self._lora = LoraSlot(str(model_path), lora, trust_remote_code) if lora else None
        args = EngineArgs(
            **self._cpu_scheduling(max_model_len),
            model=str(model_path),
            dtype=str(self.dtype).removeprefix("torch."),
            seed=seed,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
            trust_remote_code=trust_remote_code,
            logprobs_mode="processed_logprobs",
            disable_log_stats=True,
            **({"max_num_seqs": max_num_seqs} if max_num_seqs else {}),
            **(self._lora.engine_args() if self._lora else {}),
        )
        self._engine = LLMEngine.from_engine_args(args)
        # what the engine really computes in (its own resolution of the requested dtype, on this node)
        model_config = getattr(self._engine, "model_config", None)
        self.dtype = getattr(model_config, "dtype", None) or self.dtype
        self._requests: dict[str, tuple[GenerationRequest, int]] = {}
        self._updating = False

    @staticmethod
    def _cpu_scheduling(max_model_len: int | None) -> dict[str, Any]:
        """On vLLM's CPU build, prompts are never prefilled in pieces. A piece's sampled token is thrown away and
        vLLM rewinds that request's seeded generator by its offset, which CPU generators do not have: the engine
        died with "CPU Generator does not use offset" once a step's prompts passed its token budget (64 episodes
        of 4 turns). Whole prompts also keep a seed's samples independent of how requests were batched."""
        from vllm.config import SchedulerConfig
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return {}
        return {"enable_chunked_prefill": False,
                "max_num_batched_tokens": max(max_model_len or 0, SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS)}

    def _sampling_params(self, spec: SamplingSpec, index: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=max(spec.top_k, 0),
            max_tokens=spec.max_new_tokens,
            min_tokens=spec.min_new_tokens,
            stop_token_ids=list(spec.stop_token_ids),
            seed=None if spec.seed is None else spec.seed + index,
            logprobs=0,  # only the sampled token's log-prob
            prompt_logprobs=0 if spec.prompt_logprobs else None,  # raw log-probs (no sampling processing)
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,  # step() returns finished requests only
        )

    def _prompt(self, prompt_ids: list[int]) -> Any:
        """Token ids as an engine input (vLLM 0.32 deprecates raw prompt dicts in favour of the renderer)."""
        prompt = {"prompt_token_ids": list(prompt_ids)}
        renderer = getattr(self._engine, "renderer", None)
        return renderer.render_cmpl([prompt])[0] if hasattr(renderer, "render_cmpl") else prompt

    def add(self, request: GenerationRequest) -> None:
        """Queue `request`; n samples become n engine requests so each finishes on its own."""
        for i in request.sample_indices:
            engine_id = f"{request.request_id}#{i}"
            if engine_id in self._requests:
                raise ValueError(f"request id {request.request_id!r} is already in flight")
            self._engine.add_request(engine_id, self._prompt(request.prompt_ids), self._sampling_params(request.sampling, i),
                                     lora_request=self._lora.request if self._lora else None)
            self._requests[engine_id] = (request, i)

    def step(self) -> list[Completion]:
        """One engine iteration; returns the samples that finished in it."""
        done = []
        for out in self._engine.step():
            if not out.finished:
                continue
            request, index = self._requests.pop(out.request_id)
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            logprobs = [float(step_lp[tok].logprob) for tok, step_lp in zip(ids, sample.logprobs or [], strict=True)]
            prompt_lp = None
            if request.sampling.prompt_logprobs:
                prompt = request.prompt_ids
                prompt_lp = [float(out.prompt_logprobs[t][prompt[t]].logprob) for t in range(1, len(prompt))]
            done.append(
                Completion(
                    request_id=request.request_id,
                    sample_index=index,
                    prompt_ids=list(request.prompt_ids),
                    response_ids=ids,
                    logprobs=logprobs,
                    finish_reason="length" if sample.finish_reason == "length" else "stop",
                    weight_version=-1,  # stamped by the worker
                    prompt_logprobs=prompt_lp,
                )
            )
        return done

    def has_unfinished(self) -> bool:
        return self._engine.has_unfinished_requests()

    def num_unfinished(self) -> int:
        return self._engine.get_num_unfinished_requests()

    def reset_prefix_cache(self) -> None:
        self._engine.reset_prefix_cache()

    def begin_weight_update(self, aliases: dict[str, str] | None = None) -> None:
        """Swap every layer for a loader that buffers incoming weights until the layer is complete.

        `aliases` ({tied name: name it travels under}) are loaded too where this engine keeps a
        separate copy of them. An engine serving a LoRA adapter (`lora`) receives a new adapter instead.
        """
        if self._lora:
            self._lora.begin()
        else:
            self._engine.collective_rpc(_rpc_begin_reload, args=(dict(aliases or {}),))
        self._updating = True

    def load_weights(self, bucket: Bucket) -> None:
        """Load one bucket by HF names; a layer is repacked once all its weights have arrived."""
        if not self._updating:
            raise RuntimeError("load_weights called outside begin_weight_update / finish_weight_update")
        if self._lora:
            self._lora.load(bucket)
        else:
            self._engine.collective_rpc(_rpc_load_bucket, args=(bucket,))

    def finish_weight_update(self) -> None:
        """Process the remaining layers and drop the KV cache computed with the old weights.

        Requests still running are preempted and recomputed with the new weights; the tokens
        they had already sampled keep their old-weight log-probs. Kernels a CPU reload leaves
        stale (tied lm_head, MoE experts) are rebuilt (`vllm_layout.repair_after_reload`). A LoRA adapter is
        registered as a new adapter, which every later request uses.
        """
        if self._lora:
            self._engine.add_lora(self._lora.finish(self.dtype))
            self._lora.forget_old(self._engine)
        else:
            self._engine.collective_rpc(_rpc_finish_reload)
        self._updating = False
        self._engine.reset_prefix_cache(reset_running_requests=True)

    def checksums(self, names: list[str]) -> dict[tuple[str, Region], str]:
        """{(checkpoint name, region): checksum} over the weights every tensor-parallel rank computes with.

        `names` are the trainer's checkpoint names (they decide how fused projections are named). An engine
        serving a LoRA adapter reports the adapter's tensors instead, as its LoRA layers hold them.
        """
        if self._lora:
            from rayrlhf.actors.vllm_lora import rpc_lora_checksums

            if self._lora.request is None:
                return {}
            shapes = {n: s for n, s in self._lora.shapes.items() if n in set(names)}
            return merge_rank_checksums(self._engine.collective_rpc(rpc_lora_checksums,
                                                                    args=(self._lora.request.lora_int_id, shapes)))
        return merge_rank_checksums(self._engine.collective_rpc(_rpc_checksums, args=(list(names),)))


# ---------------------------------------------------------------------------------------------
# transformers generate
# ---------------------------------------------------------------------------------------------


class PerSampleSampler:
    """A logits processor that samples every row of a batch itself, from softmax(warped logits), with Gumbel noise
    drawn from the row's own seed and position (the Gumbel-max trick: argmax(log p + G) is a draw from p). What a
    sample gets does not depend on which other requests share its batch, as with vLLM's per-request seeds: a
    multi-turn episode's turns, which reach the engine whenever their environments answer, sample the same tokens
    however they are batched. Returns scores that make greedy search pick the drawn token, and keeps the drawn
    token's log-prob under the warped distribution (temperature, top-k, top-p; log_softmax(logits / T) without them)."""

    def __init__(self, spec: SamplingSpec, seeds: list[int | None], prompt_len: int) -> None:
        self.spec, self.prompt_len = spec, prompt_len
        self.seeds = [s if s is not None else int(torch.randint(0, 2**31 - 1, ())) for s in seeds]
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        spec, position = self.spec, input_ids.shape[1] - self.prompt_len
        logits = scores.float() / spec.temperature
        if spec.top_k > 0:
            kth = logits.topk(min(spec.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if spec.top_p < 1.0:
            ordered, order = logits.sort(dim=-1, descending=True)
            cut = ordered.softmax(dim=-1).cumsum(dim=-1) - ordered.softmax(dim=-1) >= spec.top_p  # keep the first past top_p
            logits = logits.masked_fill(cut.scatter(-1, order, cut), float("-inf"))
        logp = F.log_softmax(logits, dim=-1)
        noise = torch.stack([self._gumbel(seed, position, logits.shape[-1]) for seed in self.seeds]).to(logits.device)
        drawn = (logp + noise).argmax(dim=-1, keepdim=True)
        self.logprobs.append(logp.gather(-1, drawn).squeeze(-1))
        return torch.full_like(scores, float("-inf")).scatter(-1, drawn, 0.0)

    @staticmethod
    def _gumbel(seed: int, position: int, size: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed((seed * 1_000_003 + position * 7_919) % (2**63 - 1))
        u = torch.rand(size, generator=generator, dtype=torch.float64).clamp(1e-300, 1.0)
        return -torch.log(-torch.log(u)).float()


class HFEngine:
    """transformers `generate`, for machines without vLLM and for very small models.

    Each step runs one batch: the oldest pending request's sampling settings and every pending
    sample that shares them (left-padded). Each sample is drawn from its own seed (`PerSampleSampler`),
    so a seeded sample is reproducible whatever it is batched with.
    """

    def __init__(
        self,
        model_path: str | Path,
        dtype: str = "auto",
        seed: int = 0,
        trust_remote_code: bool = False,
        device: str = "cpu",
        max_batch_size: int = 256,
    ) -> None:
        from rayrlhf.models.hf_layout import checkpoint_renames
        from rayrlhf.models.loading import load_policy, load_tokenizer

        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.model = load_policy(model_path, dtype, trust_remote_code).to(self.device).eval()
        renames = checkpoint_renames(self.model)  # weights arrive under checkpoint names
        if renames is None:
            raise ValueError(
                f"rollout.backend=hf cannot take weight updates for {self.model.config.model_type}: transformers keeps "
                "its weights in another layout than its checkpoint (e.g. fused experts); use rollout.backend=vllm"
            )
        self._memory_name = renames
        self.dtype = next(self.model.parameters()).dtype
        tok = load_tokenizer(model_path, trust_remote_code)
        self.pad_id = int(tok.pad_token_id)
        eos = self.model.generation_config.eos_token_id
        eos_ids = {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
        if tok.eos_token_id is not None:
            eos_ids.add(int(tok.eos_token_id))
        self.eos_ids = frozenset(eos_ids)
        self.max_batch_size = max_batch_size
        self._pending: list[tuple[GenerationRequest, int]] = []
        self._loaded: set[str] = set()

    def add(self, request: GenerationRequest) -> None:
        self._pending.extend((request, i) for i in request.sample_indices)

    @staticmethod
    def _batch_key(spec: SamplingSpec) -> tuple:
        return (spec.temperature, spec.top_p, spec.top_k, spec.max_new_tokens, spec.min_new_tokens, spec.stop_token_ids,
                spec.prompt_logprobs)

    def _generation_config(self, spec: SamplingSpec, stop_ids: set[int]) -> Any:
        from transformers import GenerationConfig

        # Every knob explicit: unset ones fall back to the checkpoint's or library defaults (top_k=50). Sampling is
        # greedy search over what `PerSampleSampler` returns (it draws each row's token itself, from its own seed).
        return GenerationConfig(
            do_sample=False, top_k=None, top_p=None, temperature=None, min_p=None, typical_p=1.0, repetition_penalty=1.0,
            no_repeat_ngram_size=0, num_beams=1,
            max_new_tokens=spec.max_new_tokens, min_new_tokens=spec.min_new_tokens, eos_token_id=sorted(stop_ids),
            pad_token_id=self.pad_id, return_dict_in_generate=True, output_scores=True,
        )

    @torch.no_grad()
    def step(self) -> list[Completion]:
        """Generate one batch of pending samples; returns all of them (finished)."""
        if not self._pending:
            return []
        key = self._batch_key(self._pending[0][0].sampling)
        batch = [item for item in self._pending if self._batch_key(item[0].sampling) == key][: self.max_batch_size]
        chosen = {id(item) for item in batch}
        self._pending = [item for item in self._pending if id(item) not in chosen]
        spec = batch[0][0].sampling
        stop_ids = set(self.eos_ids) | set(spec.stop_token_ids)

        p_len = max(len(req.prompt_ids) for req, _ in batch)
        input_ids = torch.full((len(batch), p_len), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), p_len), dtype=torch.long)
        for row, (req, _) in enumerate(batch):
            input_ids[row, p_len - len(req.prompt_ids) :] = torch.as_tensor(req.prompt_ids, dtype=torch.long)
            attention[row, p_len - len(req.prompt_ids) :] = 1
        sampler = None
        if spec.temperature > 0:  # each row sampled from its own seed: independent of the batch it shares
            sampler = PerSampleSampler(spec, [None if req.sampling.seed is None else req.sampling.seed + i for req, i in batch],
                                       p_len)
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            generation_config=self._generation_config(spec, stop_ids),
            **({"logits_processor": [sampler]} if sampler is not None else {}),
        )
        tokens = out.sequences[:, p_len:].cpu()
        if sampler is not None:
            logprobs = torch.stack(sampler.logprobs, dim=1).cpu()
        else:  # greedy: log_softmax of the logits (min_new_tokens masking included, as vLLM's processed log-probs)
            scores = torch.stack(out.scores, dim=1).float()
            logprobs = F.log_softmax(scores, dim=-1).gather(-1, tokens.to(scores.device).unsqueeze(-1)).squeeze(-1).cpu()

        probes = {}  # log p of each prompt token, for requests that ask (a probe of the engine's weights)
        for row, (req, _) in enumerate(batch):
            if req.sampling.prompt_logprobs:
                ids_t = torch.as_tensor([req.prompt_ids], dtype=torch.long, device=self.device)
                logits = self.model(input_ids=ids_t).logits[0, :-1].float()
                probes[row] = F.log_softmax(logits, dim=-1).gather(-1, ids_t[0, 1:].unsqueeze(-1)).squeeze(-1).cpu().tolist()
        done = []
        for row, (req, index) in enumerate(batch):
            ids = tokens[row].tolist()
            stop_at = next((t for t, tok in enumerate(ids) if tok in stop_ids), None)
            length = len(ids) if stop_at is None else stop_at + 1  # the stop token is kept, as vLLM does
            done.append(
                Completion(
                    request_id=req.request_id,
                    sample_index=index,
                    prompt_ids=list(req.prompt_ids),
                    response_ids=ids[:length],
                    logprobs=logprobs[row, :length].tolist(),
                    finish_reason="length" if stop_at is None else "stop",
                    weight_version=-1,
                    prompt_logprobs=probes.get(row),
                )
            )
        return done

    def has_unfinished(self) -> bool:
        return bool(self._pending)

    def num_unfinished(self) -> int:
        return len(self._pending)

    def reset_prefix_cache(self) -> None:
        """transformers generate keeps no cache between batches."""

    def begin_weight_update(self, aliases: dict[str, str] | None = None) -> None:
        self._loaded = {self._memory_name.get(a, a) for a in aliases or {}}  # tied: updated with the tensor they share

    @torch.no_grad()
    def load_weights(self, bucket: Bucket) -> None:
        """Copy each tensor, named in the checkpoint format, into the model's state in place (tied weights share
        storage; a checkpoint name transformers renames in memory, like GPT-NeoX's embed_out, is renamed back)."""
        state = self.model.state_dict()
        for ck_name, tensor in _bucket_tensors(bucket, self.dtype):
            name = self._memory_name.get(ck_name, ck_name)
            if name not in state:
                raise KeyError(f"load_weights: the model has no weight named {ck_name!r}")
            if state[name].shape != tensor.shape:
                raise ValueError(f"load_weights: {name} has shape {tuple(tensor.shape)}, the model {tuple(state[name].shape)}")
            state[name].copy_(tensor)
            self._loaded.add(name)

    def finish_weight_update(self) -> None:
        missing = set(self.model.state_dict()) - self._loaded
        if missing:
            log.warning("weight update left %d tensors unchanged, e.g. %s", len(missing), sorted(missing)[:3])

    def checksums(self, names: list[str]) -> dict[tuple[str, Region], str]:
        from rayrlhf.models.hf_layout import checkpoint_state

        return {(name, full_region(t.shape)): tensor_checksum(t) for name, t in checkpoint_state(self.model, aliases=True)}


def make_engine(backend: str, **kwargs: Any) -> Engine:
    """Build the engine named by `rollout.backend`; kwargs are the engine's constructor arguments."""
    if backend == "vllm":
        return VLLMEngine(**kwargs)
    if backend == "hf":
        return HFEngine(**kwargs)
    raise ValueError(f"rollout.backend must be 'vllm' or 'hf' here, got {backend!r} ('auto' is decided before: plan.resolve_backend)")


__all__ = ["Engine", "HFEngine", "VLLMEngine", "make_engine", "merge_rank_checksums"]

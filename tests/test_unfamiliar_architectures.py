"""Architectures outside the matrix, through real Ray, DeepSpeed and vLLM: nothing in the code names them.

- GPT-NeoX: vLLM 0.32 runs it through its transformers backend, whose loader renames the checkpoint's
  `gpt_neox.*` to `model.*` and transformers' `embed_out` to `lm_head`;
- OPT: a native vLLM model whose loader moves `q/k/v_proj` into a fused `qkv_proj` (shards "q", "k", "v"),
  with tied embeddings and learned positions;
- StableLM: native, `gate/up_proj` stacked into `gate_up_proj` (shards 0, 1) without a packed-modules
  table, partial rotary, layer norms with biases.

For each: a ZeRO-3 policy rank and a vLLM worker started from the trainer's export; the verification
passes on the fresh export, fails after a training step, passes after the sync, and vLLM samples with
the trainer's log-probs before and after. Also here: the dtype weights travel in is the engines' own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from rayrlhf.actors.rollout import create_rollout_workers
from rayrlhf.actors.trainer import TrainerSettings
from rayrlhf.actors.trainer_group import TrainerGroup
from rayrlhf.actors.types import GenerationRequest, SamplingSpec
from rayrlhf.actors.weight_sync import WeightSyncError, broadcast_weights, engine_dtype, verify_weights
from rayrlhf.config import ModelConfig, RolloutConfig
from rayrlhf.errors import InvalidInput
from rayrlhf.models.architectures import build_model_type
from rayrlhf.models.forward import pack_batch
from rayrlhf.models.loading import load_tokenizer
from rayrlhf.models.tiny import build_tiny_model
from rayrlhf.orchestrator.workers import collect

pytestmark = pytest.mark.slow

SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 512}
MODELS = {
    "gpt_neox": {**SHAPE, "intermediate_size": 128},
    "opt": {**SHAPE, "ffn_dim": 128, "word_embed_proj_dim": 64},
    "stablelm": {**SHAPE, "intermediate_size": 128, "num_key_value_heads": 2},
}
WORDS = ("cab", "hgfe", "dcba", "bb")


def logprob_gap(group: TrainerGroup, worker: ray.actor.ActorHandle, prompts: list[list[int]], pad: int, tag: str) -> float:
    """max |vLLM sampling log-prob - trainer log-prob| over 2 samples per prompt at temperature 1."""
    spec = SamplingSpec(n=2, temperature=1.0, max_new_tokens=12, seed=3)
    done = collect(worker, [GenerationRequest(f"{tag}-{i}", p, spec) for i, p in enumerate(prompts)])
    batch = pack_batch([c.prompt_ids for c in done], [c.response_ids for c in done], pad)
    trainer = group.forward_logprobs(batch)["logp"]
    return max((trainer[i, : len(c.logprobs)] - torch.tensor(c.logprobs)).abs().max().item() for i, c in enumerate(done))


@pytest.fixture(scope="module", params=sorted(MODELS))
def pair(request: pytest.FixtureRequest, ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    model_type = request.param
    path = build_model_type(model_type, tmp_path_factory.mktemp(model_type) / "model", **MODELS[model_type])
    settings = TrainerSettings(zero_stage=3, micro_batch_size=8, lr=1e-2, dtype="float32")
    group = TrainerGroup("policy", str(path), settings, num_ranks=1, num_cpus=0.5, name_prefix=f"unfamiliar-{model_type}")
    exported = path.parent / "exported"
    group.export_hf(str(exported))
    rollout = RolloutConfig(backend="vllm", num_workers=1, num_cpus=0.5, dtype="float32")
    [worker] = create_rollout_workers(exported, rollout, ModelConfig(dtype="float32"), seed=0, max_prompt_tokens=32,
                                      name_prefix=f"unfamiliar-{model_type}-rollout")
    tok = load_tokenizer(path)
    prompts = [tok(f"sort: {w}", add_special_tokens=False)["input_ids"] for w in WORDS]
    yield model_type, path, group, worker, prompts, tok.pad_token_id
    group.shutdown()
    ray.kill(worker)


def test_a_sync_into_vllm_verifies_with_names_its_loader_maps(pair: tuple) -> None:
    model_type, path, group, worker, prompts, pad = pair
    verify_weights(group, [worker], "float32")  # every engine weight is known to the trainer under its name
    fresh = logprob_gap(group, worker, prompts, pad, "fresh")
    assert fresh < 1e-3, fresh
    target = pack_batch(prompts, [[prompts[0][-1]] * 4] * len(prompts), pad)
    for _ in range(2):
        group.train_step(target, "sft", {})
    with pytest.raises(WeightSyncError, match="differ from the trainer"):
        verify_weights(group, [worker], "float32")
    broadcast_weights(group, [worker], 1, bucket_bytes=64 * 1024, dtype="float32")
    verify_weights(group, [worker], "float32")
    synced = logprob_gap(group, worker, prompts, pad, "synced")  # the engine computes with the synced weights
    print(f"\n{model_type}: log-prob gap {fresh:.2g} fresh, {synced:.2g} after a verified sync")
    assert synced < 1e-3, synced


def test_weights_travel_in_the_dtype_the_engines_resolved(ray_local: None, tmp_path: Path) -> None:
    """`auto` is decided on the engine's node (float32 on a CPU node, whatever the driver would say); workers that
    compute in different dtypes are refused, naming rollout.dtype."""
    path = build_tiny_model(tmp_path / "tiny")
    rollout = RolloutConfig(backend="hf", num_workers=1, num_cpus=0.25)
    auto = create_rollout_workers(path, rollout, ModelConfig(dtype="auto"), seed=0, name_prefix="dtype-auto")
    bf16 = create_rollout_workers(path, rollout, ModelConfig(dtype="bfloat16"), seed=0, name_prefix="dtype-bf16")
    try:
        assert engine_dtype(auto) == ("bfloat16" if torch.cuda.is_available() else "float32")
        assert engine_dtype(bf16) == "bfloat16"
        with pytest.raises(InvalidInput, match=r"different dtypes \(.*\): set rollout\.dtype"):
            engine_dtype(auto + bf16)
    finally:
        for w in auto + bf16:
            ray.kill(w)

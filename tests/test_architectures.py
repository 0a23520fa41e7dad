"""The architecture matrix through real Ray, vLLM and DeepSpeed: every row of `MATRIX`, and tensor parallelism.

For each row, one ZeRO-3 policy rank and one vLLM rollout worker started from the trainer's own
Hugging Face export (so the export loads in vLLM):

- vLLM samples, and its sampling log-probs agree with the trainer's recomputed ones (< 1e-3 in fp32);
- after a training step the verified weight sync passes, greedy outputs change, and log-probs
  agree again (a kernel left on old weights would break this even when checksums pass);
- a corrupted tensor on the worker makes the verification fail naming it;
- a critic and a reward model build from the architecture; the exported policy loads in
  transformers and computes the trainer's log-probs.

The last case runs one row with a tensor-parallel-2 worker: the sync goes into both shards and
the verification compares each rank's slices with the trainer's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from rayrlhf.actors.rollout import create_rollout_workers
from rayrlhf.actors.trainer import TrainerSettings
from rayrlhf.actors.trainer_group import TrainerGroup
from rayrlhf.actors.types import Completion, GenerationRequest, SamplingSpec
from rayrlhf.actors.weight_sync import WeightSyncError, broadcast_weights, verify_weights
from rayrlhf.actors.weights import bucketize
from rayrlhf.config import ModelConfig, RolloutConfig
from rayrlhf.models.architectures import MATRIX, build_architecture
from rayrlhf.models.forward import pack_batch, sequence_scores, token_logprobs, token_values
from rayrlhf.models.hf_layout import checkpoint_state
from rayrlhf.models.loading import load_critic, load_reward_model, load_tokenizer
from rayrlhf.orchestrator.workers import collect

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

ROWS = [(name, 1) for name in MATRIX] + [("mistral", 2)]  # mistral: one k/v head, replicated over 2 ranks
WORDS = ("cab", "hgfe", "dcba", "bb")


@dataclass
class Row:
    name: str
    tp: int
    path: Path
    group: TrainerGroup
    worker: ray.actor.ActorHandle
    prompts: list[list[int]]
    pad: int
    version: int = 0
    figures: dict[str, float] = field(default_factory=dict)


def generate(row: Row, tag: str, temperature: float, n: int = 1) -> list[Completion]:
    spec = SamplingSpec(n=n, temperature=temperature, max_new_tokens=12, seed=3)
    reqs = [GenerationRequest(f"{tag}-{i}", p, spec) for i, p in enumerate(row.prompts)]
    out = collect(row.worker, reqs)
    return sorted(out, key=lambda c: (int(c.request_id.rsplit("-", 1)[1]), c.sample_index))


def logprob_gap(row: Row, tag: str) -> float:
    """max |vLLM sampling log-prob - trainer log-prob| over 2 samples per prompt at temperature 1."""
    done = generate(row, tag, 1.0, n=2)
    batch = pack_batch([c.prompt_ids for c in done], [c.response_ids for c in done], row.pad)
    trainer = row.group.forward_logprobs(batch)["logp"]
    return max((trainer[i, : len(c.logprobs)] - torch.tensor(c.logprobs)).abs().max().item() for i, c in enumerate(done))


def sync(row: Row) -> None:
    row.version += 1
    broadcast_weights(row.group, [row.worker], row.version, bucket_bytes=64 * 1024, dtype="float32")
    verify_weights(row.group, [row.worker], "float32")


@pytest.fixture(scope="module", params=ROWS, ids=[f"{n}-tp{tp}" for n, tp in ROWS])
def row(request: pytest.FixtureRequest, ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Row]:
    name, tp = request.param
    path = build_architecture(name, tmp_path_factory.mktemp(f"{name}-tp{tp}") / "model")
    settings = TrainerSettings(zero_stage=3, micro_batch_size=8, lr=1e-2, dtype="float32")
    group = TrainerGroup("policy", str(path), settings, num_ranks=1, num_cpus=0.5, name_prefix=f"arch-{name}-{tp}")
    exported = path.parent / "exported"
    group.export_hf(str(exported))  # the worker starts from the trainer's export: final/'s format loads in vLLM
    rollout = RolloutConfig(backend="vllm", num_workers=1, num_cpus=0.5, dtype="float32", tensor_parallel_size=tp)
    [worker] = create_rollout_workers(exported, rollout, ModelConfig(dtype="float32"), seed=0,
                                      max_prompt_tokens=32, name_prefix=f"arch-{name}-{tp}-rollout")
    tok = load_tokenizer(path)
    prompts = [tok(f"sort: {w}", add_special_tokens=False)["input_ids"] for w in WORDS]
    state = Row(name, tp, path, group, worker, prompts, tok.pad_token_id)
    yield state
    print(f"\n{name} tp={tp}: " + ", ".join(f"{k} {v:.2g}" for k, v in state.figures.items()))
    group.shutdown()
    ray.kill(worker)


def test_vllm_samples_with_the_trainers_logprobs(row: Row) -> None:
    verify_weights(row.group, [row.worker], "float32")  # the exported checkpoint is what the trainer holds
    gap = logprob_gap(row, "fresh")
    row.figures["logprob gap"] = gap
    assert gap < 1e-3


def test_a_training_step_syncs_verified_and_changes_greedy_outputs(row: Row) -> None:
    before = [c.response_ids for c in generate(row, "greedy0", 0.0)]
    target = pack_batch(row.prompts, [[row.prompts[0][-1]] * 4] * len(row.prompts), row.pad)
    for _ in range(2):
        row.group.train_step(target, "sft", {})
    with pytest.raises(WeightSyncError, match="differ from the trainer"):
        verify_weights(row.group, [row.worker], "float32")  # the worker still has the old weights
    sync(row)
    assert [c.response_ids for c in generate(row, "greedy1", 0.0)] != before
    gap = logprob_gap(row, "synced")  # every kernel computes with the new weights, not only the checksums
    row.figures["logprob gap after sync"] = gap
    assert gap < 1e-3


def test_verification_names_a_corrupted_tensor(row: Row) -> None:
    """Load wrong values for two whole layers into the worker; the verification must name them."""
    trained = dict(checkpoint_state(AutoModelForCausalLM.from_pretrained(row.path, dtype=torch.float32)))
    targets = [n for n in ("model.norm.weight", "model.layers.0.mlp.down_proj.weight") if n in trained]
    bad = [(n, trained[n] + 0.5) for n in targets]
    ray.get(row.worker.begin_weight_update.remote({}))
    for bucket in bucketize(bad):
        ray.get(row.worker.load_weights.remote(bucket))
    ray.get(row.worker.finish_weight_update.remote(row.version))
    with pytest.raises(WeightSyncError) as info:
        verify_weights(row.group, [row.worker], "float32")
    for name in targets:
        assert name in str(info.value)
    sync(row)  # a full sync repairs it


def test_critic_and_reward_model_build_from_the_architecture(row: Row) -> None:
    batch = pack_batch(row.prompts, [[5, 6, 7]] * len(row.prompts), row.pad)
    with torch.no_grad():
        values = token_values(load_critic(row.path, "float32").eval(), batch)
        scores = sequence_scores(load_reward_model(row.path, "float32").eval(), batch)
    assert values.shape == batch["mask"].shape and torch.isfinite(values).all() and values.std() > 0
    assert scores.shape == (len(row.prompts),) and torch.isfinite(scores).all()


def test_exported_policy_loads_in_transformers_with_the_trainers_logprobs(row: Row, tmp_path: Path) -> None:
    row.group.export_hf(str(tmp_path / "final"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final", dtype=torch.float32).eval()
    batch = pack_batch(row.prompts, [[5, 6, 7, 8]] * len(row.prompts), row.pad)
    with torch.no_grad():
        logp, _ = token_logprobs(model, batch)
    torch.testing.assert_close(logp, row.group.forward_logprobs(batch)["logp"], atol=1e-5, rtol=0)

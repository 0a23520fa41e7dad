"""The weight sync end to end: a ZeRO-3 policy of 2 ranks into 2 vLLM rollout workers.

After a training step changes the policy, a sync must make every worker's per-tensor
checksums equal the trainer's, bump `weight_version`, change greedy outputs, and leave the
workers' sampling log-probs in agreement with the trainer's recomputed ones.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import ray
import torch

from rayrlhf.actors.rollout import create_rollout_workers
from rayrlhf.actors.trainer import TrainerSettings
from rayrlhf.actors.trainer_group import TrainerGroup
from rayrlhf.actors.types import Completion, GenerationRequest, SamplingSpec
from rayrlhf.actors.weight_sync import WeightSyncError, broadcast_weights, verify_weights
from rayrlhf.config import ModelConfig, RolloutConfig
from rayrlhf.models.forward import pack_batch
from rayrlhf.models.loading import load_tokenizer
from rayrlhf.orchestrator.workers import collect

log = logging.getLogger(__name__)


def generate(worker, prompts: list[list[int]], tag: str, temperature: float, max_new: int = 12) -> list[Completion]:
    spec = SamplingSpec(temperature=temperature, max_new_tokens=max_new, seed=7)
    reqs = [GenerationRequest(f"{tag}-{i}", p, spec) for i, p in enumerate(prompts)]
    out = collect(worker, reqs)
    return sorted(out, key=lambda c: int(c.request_id.rsplit("-", 1)[1]))


@pytest.fixture(scope="module")
def setup(ray_local: None, tiny_model: Path):
    settings = TrainerSettings(zero_stage=3, micro_batch_size=4, lr=1e-2, dtype="float32")
    group = TrainerGroup("policy", str(tiny_model), settings, num_ranks=2, name_prefix="sync-policy")
    workers = create_rollout_workers(
        tiny_model, RolloutConfig(backend="vllm", num_workers=2, num_cpus=0.5, max_new_tokens=12, dtype="float32"),
        ModelConfig(dtype="float32"), seed=0, name_prefix="sync-rollout", max_prompt_tokens=32,
    )
    tok = load_tokenizer(tiny_model)
    prompts = [tok(f"sort: {w}", add_special_tokens=False)["input_ids"] for w in ("cab", "hgfe", "dcba", "bb")]
    yield group, workers, prompts, tok
    group.shutdown()
    for w in workers:
        ray.kill(w)


def test_sync_from_zero3_into_two_vllm_workers(setup) -> None:
    group, workers, prompts, tok = setup
    verify_weights(group, workers, "float32")  # same checkpoint on both sides before training
    before = [c.response_ids for c in generate(workers[0], prompts, "before", temperature=0.0)]

    # Change the policy: a few SFT steps towards an arbitrary response.
    batch = pack_batch(prompts, [tok("aaaa", add_special_tokens=False)["input_ids"]] * 4, tok.pad_token_id)
    for _ in range(2):
        group.train_step(batch, "sft", {})
    with pytest.raises(WeightSyncError, match="differ from the trainer"):
        verify_weights(group, workers, "float32")

    result = broadcast_weights(group, workers, version=1, bucket_bytes=32 * 1024, dtype="float32")
    assert result.moved > 1 and result.synced == [0, 1] and not result.failed  # several pipelined buckets
    verify_weights(group, workers, "float32")  # every tensor of every worker equals the trainer's
    assert ray.get([w.weight_version.remote() for w in workers]) == [1, 1]

    for worker in workers:
        after = generate(worker, prompts, "after", temperature=0.0)
        assert all(c.weight_version == 1 for c in after)
        assert [c.response_ids for c in after] != before


def test_sampling_logprobs_agree_with_the_trainer(setup) -> None:
    group, workers, prompts, tok = setup
    completions = generate(workers[1], prompts * 2, "lp", temperature=1.0)
    batch = pack_batch([c.prompt_ids for c in completions], [c.response_ids for c in completions], tok.pad_token_id)
    trainer_logp = group.forward_logprobs(batch)["logp"]
    diffs = [
        (trainer_logp[i, : len(c.logprobs)] - torch.tensor(c.logprobs)).abs().max().item()
        for i, c in enumerate(completions)
    ]
    log.info("max |vLLM logprob - trainer logprob| = %.3g", max(diffs))
    print(f"max |vLLM sampling logprob - trainer logprob| = {max(diffs):.3g}")
    assert max(diffs) < 1e-3
    # Meaningful only if the policy is not collapsed onto one token.
    assert sum(sum(c.logprobs) for c in completions) / sum(len(c.logprobs) for c in completions) < -1.0


def test_collective_sync_over_gloo(setup) -> None:
    """The broadcast-group transport (gloo on CPU) from the same ZeRO-3 x2 policy, twice on one group."""
    group, workers, prompts, tok = setup
    batch = pack_batch(prompts, [tok("bbbb", add_special_tokens=False)["input_ids"]] * 4, tok.pad_token_id)
    for version in (2, 3):
        group.train_step(batch, "sft", {})
        with pytest.raises(WeightSyncError, match="differ from the trainer"):
            verify_weights(group, workers, "float32")
        sent = broadcast_weights(group, workers, version, bucket_bytes=32 * 1024, dtype="float32", backend="collective")
        assert sent.moved == len(group.weight_layout("float32")[0]) and sent.synced == [0, 1]  # one broadcast per tensor
        verify_weights(group, workers, "float32")
        assert ray.get([w.weight_version.remote() for w in workers]) == [version, version]
    assert group._weight_group_count == 1  # formed once, reused
    assert all(c.weight_version == 3 for c in generate(workers[0], prompts, "collective", temperature=0.0))
    with pytest.raises(ValueError, match="unknown weight sync backend"):
        broadcast_weights(group, workers, 4, 1024, "float32", backend="carrier-pigeon")


def _fail_loads(worker: object) -> None:
    """Runs inside a rollout worker: its engine fails on every bucket (like a tensor-parallel child that died)."""
    def broken(bucket):  # noqa: ANN001
        raise RuntimeError("a tensor-parallel worker process died")

    worker._engine.load_weights = broken  # type: ignore[attr-defined]


def _stall(worker: object) -> None:
    """Runs inside a rollout worker: its engine thread is handed work that never ends (a hung engine)."""
    import time
    from concurrent.futures import Future

    def hold() -> None:  # named, so that the hang's stack dump shows it
        time.sleep(3600)

    with worker._cond:  # type: ignore[attr-defined]
        worker._calls.append((hold, (), Future()))  # type: ignore[attr-defined]
        worker._cond.notify_all()  # type: ignore[attr-defined]


def test_a_worker_that_fails_or_hangs_during_the_sync_is_blamed_not_the_trainer(setup) -> None:
    """Before: a worker whose engine failed during the sync, or whose engine thread was stuck, was reported as a
    trainer failure (TrainerFailed), which rolled the trainers back to a checkpoint. The other worker still gets the
    weights. (Last in this module: it leaves both workers broken.)"""
    import sys

    group, workers, prompts, tok = setup
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    batch = pack_batch(prompts, [tok("cccc", add_special_tokens=False)["input_ids"]] * 4, tok.pad_token_id)
    group.train_step(batch, "sft", {})
    ray.get(workers[0].__ray_call__.remote(_fail_loads))
    result = broadcast_weights(group, workers, 5, bucket_bytes=32 * 1024, dtype="float32", timeout_s=60)
    assert list(result.failed) == [0] and result.failed[0][0] == "error" and "tensor-parallel" in result.failed[0][1]
    assert result.synced == [1] and ray.get(workers[1].weight_version.remote()) == 5
    verify_weights(group, [workers[1]], "float32")

    group.train_step(batch, "sft", {})
    ray.get(workers[1].__ray_call__.remote(_stall))
    result = broadcast_weights(group, [workers[1]], 6, bucket_bytes=32 * 1024, dtype="float32", timeout_s=5)
    assert result.failed == {0: ("timeout", "no answer within faults.sync_timeout_s")} and result.synced == []
    assert group.broken is None  # the trainer group is healthy: nothing to rebuild
    group.checksums("float32", [])  # and it still answers

"""Rollout workers on real Ray with real engines (vLLM on CPU and transformers generate).

One worker per backend is started for the whole module (a vLLM engine takes ~15 s to start
here). The weight-update test changes the workers' weights, so it runs last.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from rayrlhf.actors.rollout import create_rollout_workers
from rayrlhf.actors.types import Completion, GenerationRequest, SamplingSpec
from rayrlhf.actors.weights import bucketize, tensor_checksum, whole_checksums
from rayrlhf.config import ModelConfig, RolloutConfig
from rayrlhf.models.forward import pack_batch, token_logprobs
from rayrlhf.models.loading import load_policy, load_tokenizer
from rayrlhf.orchestrator.workers import collect

log = logging.getLogger(__name__)

BACKENDS = ("vllm", "hf")
PROMPTS = ["U: sort: cab\nA: ", "U: 12 + 3\nA: ", "U: hello\nA: "]


@pytest.fixture(scope="module")
def workers(ray_local: None, tiny_model: Path) -> Iterator[dict[str, ray.actor.ActorHandle]]:
    started: dict[str, ray.actor.ActorHandle] = {}
    try:
        for backend in BACKENDS:  # both engines start in parallel
            cfg = RolloutConfig(backend=backend, max_new_tokens=64, num_cpus=1)
            [started[backend]] = create_rollout_workers(
                tiny_model, cfg, ModelConfig(dtype="float32"), seed=0, max_prompt_tokens=64,
                name_prefix=f"test-{backend}", wait=False,
            )
        assert ray.get([w.ready.remote() for w in started.values()]) == [True] * len(started)
        yield started
    finally:
        for handle in started.values():
            ray.kill(handle)


@pytest.fixture(scope="module")
def prompt_ids(tiny_model: Path) -> list[list[int]]:
    tok = load_tokenizer(tiny_model)
    return [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def stream(worker: ray.actor.ActorHandle, requests: list[GenerationRequest]) -> list[Completion]:
    """Consume a streaming generate call, in arrival order."""
    return collect(worker, requests)


def requests_for(prompts: list[list[int]], tag: str, **sampling: object) -> list[GenerationRequest]:
    return [GenerationRequest(f"{tag}-{i}", p, SamplingSpec(**sampling)) for i, p in enumerate(prompts)]


def safetensors_checksums(path: Path) -> dict[str, str]:
    return {name: tensor_checksum(t) for name, t in load_file(str(path / "model.safetensors")).items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_streams_complete_samples(backend: str, workers: dict, prompt_ids: list[list[int]]) -> None:
    reqs = requests_for(prompt_ids, f"a-{backend}", n=2, temperature=1.0, max_new_tokens=16, seed=1)
    completions = stream(workers[backend], reqs)
    assert sorted((c.request_id, c.sample_index) for c in completions) == sorted(
        (r.request_id, i) for r in reqs for i in range(2)
    )
    by_id = {r.request_id: r for r in reqs}
    for c in completions:
        assert c.prompt_ids == by_id[c.request_id].prompt_ids
        assert 0 < len(c.response_ids) <= 16
        assert len(c.logprobs) == len(c.response_ids)
        assert all(lp <= 0.0 for lp in c.logprobs)
        assert c.finish_reason in ("stop", "length")
        assert (c.finish_reason == "length") == (len(c.response_ids) == 16 and c.response_ids[-1] != 2)
        assert c.weight_version == 0
        assert c.worker == f"test-{backend}-0"
    assert ray.get(workers[backend].load.remote()) == 0


def test_vllm_streams_short_samples_before_long_ones(workers: dict, prompt_ids: list[list[int]]) -> None:
    """Short requests submitted after long ones come back first, while the long ones still run."""
    worker = workers["vllm"]
    long_reqs = requests_for(prompt_ids * 2, "b-long", temperature=1.0, max_new_tokens=200, seed=3)
    short_reqs = requests_for(prompt_ids, "b-short", temperature=1.0, max_new_tokens=2, seed=4)
    arrived: list[Completion] = []
    load_after_first = None
    for ref in worker.generate.options(num_returns="streaming").remote(long_reqs + short_reqs):
        arrived.extend(ray.get(ref))  # each item: the completions that finished since the last one
        if load_after_first is None:
            load_after_first = ray.get(worker.load.remote())
    assert len(arrived) == len(long_reqs) + len(short_reqs)
    order = {(c.request_id): i for i, c in enumerate(arrived)}
    last_short = max(order[r.request_id] for r in short_reqs)
    long_done = [c for c in arrived if c.request_id.startswith("b-long") and len(c.response_ids) > 20]
    assert long_done, "every long sample stopped within 20 tokens; the test needs at least one long one"
    assert all(order[c.request_id] > last_short for c in long_done)
    assert load_after_first is not None and load_after_first >= len(long_done)  # in flight, readable mid-call


def test_vllm_rejects_an_overlong_prompt_and_keeps_serving(workers: dict, prompt_ids: list[list[int]]) -> None:
    worker = workers["vllm"]
    too_long = GenerationRequest("f-long", [5] * 200, SamplingSpec(max_new_tokens=8))  # context is 64 + 64
    with pytest.raises(ray.exceptions.RayTaskError, match="f-long"):
        stream(worker, [too_long])
    assert len(stream(worker, requests_for(prompt_ids, "f-ok", max_new_tokens=4))) == len(prompt_ids)
    assert ray.get(worker.load.remote()) == 0


def test_vllm_seeded_prompts_past_a_steps_token_budget_sample_as_they_would_alone(
    workers: dict, tiny_model: Path
) -> None:
    """Before: 48 seeded 60-token prompts at once (2880 tokens, over vLLM's 2048-token step budget) made vLLM's CPU
    build prefill one in pieces and rewind its seeded generator, which CPU generators cannot do: the engine died
    ("CPU Generator does not use offset"; seen with 64 episodes of 4 turns). Prompts are now never split."""
    tok = load_tokenizer(tiny_model)
    text = tok("sort: " + "hgfedcba " * 12, add_special_tokens=False)["input_ids"]
    assert len(text) >= 66
    crowd = [GenerationRequest(f"budget-{i}", text[i % 6: i % 6 + 60], SamplingSpec(max_new_tokens=4, seed=i))
             for i in range(48)]
    done = {c.request_id: c.response_ids for c in stream(workers["vllm"], crowd)}
    assert sorted(done) == sorted(r.request_id for r in crowd)
    for i in (0, 47):  # the same tokens as when the request is alone in the engine
        [alone] = stream(workers["vllm"], [GenerationRequest(f"alone-{i}", crowd[i].prompt_ids, crowd[i].sampling)])
        assert alone.response_ids == done[f"budget-{i}"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_checksums_equal_the_checkpoint(backend: str, workers: dict, tiny_model: Path) -> None:
    expected = safetensors_checksums(tiny_model)
    actual = ray.get(workers[backend].checksums.remote(list(expected)))
    assert whole_checksums(actual) == expected
    assert all(region == tuple((0, n) for n in shape) for (name, region), shape in
               zip(actual, [load_file(str(tiny_model / "model.safetensors"))[n].shape for n, _ in actual], strict=True))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_logprobs_match_the_trainer(
    backend: str, temperature: float, workers: dict, tiny_model: Path, prompt_ids: list[list[int]]
) -> None:
    """Engine log-probs equal log_softmax(logits / T) recomputed by the HF model for the same tokens."""
    reqs = requests_for(prompt_ids, f"e-{backend}-{temperature}", n=2, temperature=temperature, max_new_tokens=24, seed=5)
    completions = stream(workers[backend], reqs)
    model = load_policy(tiny_model, dtype="float32").eval()
    batch = pack_batch([c.prompt_ids for c in completions], [c.response_ids for c in completions], pad_id=0)
    with torch.no_grad():
        expected, _ = token_logprobs(model, batch, temperature=temperature)
    got = torch.zeros_like(expected)
    for row, c in enumerate(completions):
        got[row, : len(c.logprobs)] = torch.tensor(c.logprobs)
    diff = ((got - expected) * batch["mask"]).abs().max().item()
    print(f"\n{backend} T={temperature}: max |engine logprob - trainer logprob| = {diff:.2e}")
    log.info("%s T=%s: max logprob diff %.2e", backend, temperature, diff)
    assert diff < 1e-3


def _record_engine_threads(worker: object) -> str:
    """Runs inside a rollout worker: every later engine call notes the thread it ran on; returns the engine thread's name."""
    import threading

    seen = worker.engine_threads_seen = set()  # type: ignore[attr-defined]
    engine = worker._engine  # type: ignore[attr-defined]
    def noting(method):  # noqa: ANN001, ANN202
        def noted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            seen.add(threading.current_thread().name)
            return method(*args, **kwargs)

        return noted

    for name in ("add", "step", "begin_weight_update", "load_weights", "finish_weight_update", "checksums"):
        setattr(engine, name, noting(getattr(engine, name)))
    return worker._thread.name  # type: ignore[attr-defined]


def test_weight_update_changes_weights_version_and_outputs(workers: dict, tiny_model: Path, prompt_ids: list[list[int]]) -> None:
    """Also: every engine call, the sync's included, runs on the worker's engine thread (torch's OpenMP threads slept
    between kernels when the engine computed on two threads: docs/performance.md)."""
    import sys

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    engine_thread = {b: ray.get(w.__ray_call__.remote(_record_engine_threads)) for b, w in workers.items()}
    greedy = {"temperature": 0.0, "max_new_tokens": 24}
    before = {b: {c.request_id: c.response_ids for c in stream(w, requests_for(prompt_ids, "d-0", **greedy))} for b, w in workers.items()}

    state = load_policy(tiny_model, dtype="float32").state_dict()
    gen = torch.Generator().manual_seed(0)
    new_state = {name: t + 0.05 * torch.randn(t.shape, generator=gen) for name, t in state.items()}
    expected = {name: tensor_checksum(t) for name, t in new_state.items()}
    buckets = [ray.put(b) for b in bucketize(new_state.items(), bucket_bytes=64 * 1024)]
    assert len(buckets) > 1  # exercise several buckets per update

    handles = list(workers.values())
    ray.get([w.begin_weight_update.remote() for w in handles])
    for ref in buckets:
        ray.get([w.load_weights.remote(ref) for w in handles])
    ray.get([w.finish_weight_update.remote(1) for w in handles])

    for backend, worker in workers.items():
        assert whole_checksums(ray.get(worker.checksums.remote(list(expected)))) == expected, backend
        assert ray.get(worker.weight_version.remote()) == 1
        after = stream(worker, requests_for(prompt_ids, "d-1", **greedy))
        assert all(c.weight_version == 1 for c in after)
        changed = [c.response_ids != before[backend][c.request_id.replace("d-1", "d-0")] for c in after]
        assert any(changed), f"{backend}: greedy outputs did not change after the weight update"
        seen = ray.get(worker.__ray_call__.remote(lambda w: sorted(w.engine_threads_seen)))
        assert seen == [engine_thread[backend]], backend


def test_transformers_samples_are_reproducible_whatever_they_are_batched_with(tiny_model: Path,
                                                                              prompt_ids: list[list[int]]) -> None:
    """Each sample is drawn from its own seed (Gumbel-max over the warped logits), as vLLM's per-request seeds: a
    multi-turn episode's turns reach the engine whenever their environments answer, in whatever batches, and must
    sample the same tokens every time. Their log-probs are log_softmax(logits / T) of the drawn tokens."""
    import torch.nn.functional as F

    from rayrlhf.actors.engines import HFEngine

    engine = HFEngine(tiny_model, dtype="float32")
    spec = SamplingSpec(n=2, temperature=0.9, max_new_tokens=10, seed=123)

    def run(requests: list[GenerationRequest]) -> dict[tuple[str, int], tuple[list[int], list[float]]]:
        for r in requests:
            engine.add(r)
        out = {}
        while engine.has_unfinished():
            out.update({(c.request_id, c.sample_index): (c.response_ids, c.logprobs) for c in engine.step()})
        return out

    alone = run([GenerationRequest("a", prompt_ids[0], spec)])
    crowded = run([GenerationRequest(f"x{i}", p, SamplingSpec(n=3, temperature=0.9, max_new_tokens=10, seed=9 + i))
                   for i, p in enumerate(prompt_ids[1:4])] + [GenerationRequest("a", prompt_ids[0], spec)])
    for k in (("a", 0), ("a", 1)):  # the same tokens; log-probs to float rounding (other rows pad the batch)
        assert alone[k][0] == crowded[k][0]
        assert torch.allclose(torch.tensor(alone[k][1]), torch.tensor(crowded[k][1]), atol=1e-5)
    assert alone[("a", 0)][0] != alone[("a", 1)][0]  # two samples of one request differ (seed + index)
    ids, logprobs = alone[("a", 0)]
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([prompt_ids[0] + ids])).logits[0, len(prompt_ids[0]) - 1 : -1]
    expected = F.log_softmax(logits.float() / 0.9, dim=-1).gather(-1, torch.tensor(ids).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(torch.tensor(logprobs), expected, atol=1e-5)

"""The rollout pipeline's bookkeeping, without Ray: launch order, waiting, and the checkpoint round trip
(what an asynchronous resume restores must be exactly what was buffered, loadable with weights_only=True)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from rayrlhf.actors.types import Completion
from rayrlhf.orchestrator.pipeline import RolloutPipeline, staleness
from rayrlhf.orchestrator.rollout import RolloutTimings


def scored_batch(step: int) -> tuple[list, RolloutTimings]:
    completions = [Completion(f"s{step}-p{i}", 0, [1, 2], [3, 4, 5], [-0.5, -0.25, -1.0], "length", step - 1, "rollout-0")
                   for i in range(2)]
    result = {"ref_logp": torch.full((2, 3), -0.75), "scores": [0.5, None], "positions": [0, 1]}
    return [(completions, result)], RolloutTimings(1.0, 2.0, [(1.5, 1.75)])


def test_state_dict_round_trip_restores_the_buffered_batches_exactly(tmp_path: Path) -> None:
    pipeline = RolloutPipeline()
    for step in (3, 4):
        pipeline.launch(step, lambda step=step: scored_batch(step))
    pipeline.wait_all()
    torch.save(pipeline.state_dict(), tmp_path / "rollouts.pt")
    pipeline.close()

    restored = RolloutPipeline()
    restored.load_state_dict(torch.load(tmp_path / "rollouts.pt", weights_only=True))
    assert restored.launched == [3, 4]
    for step in (3, 4):
        scored, timings, waited = restored.take(step)
        (completions, result), = scored
        expected, = scored_batch(step)[0]
        assert completions == expected[0]
        torch.testing.assert_close(result["ref_logp"], expected[1]["ref_logp"])
        assert result["scores"] == [0.5, None] and result["positions"] == [0, 1]
        assert (timings.gen_start, timings.gen_end, timings.score_intervals) == (1.0, 2.0, [(1.5, 1.75)])
        assert waited < 1.0
    assert restored.launched == []


def test_launch_take_errors_and_in_flight_checkpoints_are_refused() -> None:
    pipeline = RolloutPipeline()
    release = threading.Event()
    pipeline.launch(1, lambda: (release.wait(10), scored_batch(1))[1])
    with pytest.raises(RuntimeError, match="already launched"):
        pipeline.launch(1, lambda: scored_batch(1))
    with pytest.raises(RuntimeError, match="every launched batch finished"):
        pipeline.state_dict()
    with pytest.raises(RuntimeError, match="never launched"):
        pipeline.take(2)
    release.set()
    assert pipeline.take(1)[0][0][1]["scores"] == [0.5, None]
    pipeline.launch(2, lambda: (_ for _ in ()).throw(ValueError("engine died")))
    with pytest.raises(ValueError, match="engine died"):  # a failed rollout surfaces where the loop waits
        pipeline.wait_all()
    pipeline.close()


def test_staleness_counts_versions_behind_the_weights_being_trained() -> None:
    assert staleness(5, [4, 3, 2]) == {"rollout/staleness_min": 0.0, "rollout/staleness_mean": 1.0,
                                       "rollout/staleness_max": 2.0}


def test_a_refill_runs_after_the_launched_batches_on_the_one_thread_and_is_never_buffered() -> None:
    """Dynamic sampling's extra rounds (`run`) queue behind the batches already launched: two rollouts never share
    the workers, and a checkpoint taken afterwards holds only the launched batches."""
    pipeline = RolloutPipeline()
    release, order = threading.Event(), []

    def launched() -> tuple[list, RolloutTimings]:
        release.wait(10)
        order.append(("launched", threading.current_thread().name))
        return scored_batch(2)

    def refill() -> tuple[list, RolloutTimings]:
        order.append(("refill", threading.current_thread().name))
        return scored_batch(1)

    pipeline.launch(2, launched)
    threading.Timer(0.2, release.set).start()
    scored, _, waited = pipeline.run(refill)
    assert [what for what, _ in order] == ["launched", "refill"] and order[0][1] == order[1][1]
    assert waited >= 0.15 and scored[0][0][0].request_id == "s1-p0"
    assert pipeline.launched == [2] and sorted(pipeline.state_dict()) == [2]
    pipeline.close()

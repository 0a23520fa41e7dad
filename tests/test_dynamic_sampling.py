"""DAPO's dynamic sampling without Ray: the group filter on hand-made scores, and the refill loop (`fill_step`) on
hand-made scored rounds, with a draw function that records what it was asked for."""

from __future__ import annotations

import math

import pytest
import torch

from rayrlhf.actors.types import Completion
from rayrlhf.algorithms import informative_groups
from rayrlhf.config import JobConfig
from rayrlhf.orchestrator.dynamic_sampling import fill_step, informative_positions, whole_groups_unit
from rayrlhf.orchestrator.rollout import RolloutTimings

NAN = float("nan")


def test_informative_groups_by_hand() -> None:
    scores = torch.tensor([
        1.0, 1.0, 1.0,   # all equal: no signal
        0.0, 1.0, 0.0,   # differ: informative
        1.0, NAN, 0.0,   # the unscored one is ignored; 1 vs 0 still differ
        1.0, 0.0, 0.0,   # differ, but the 1.0 is unscored: the scored ones agree
        0.5, NAN, NAN,   # one scored sample: no variance
        NAN, NAN, NAN,   # nothing scored
        2.0, 2.0 + 1e-6, 2.0,  # tiny but real differences count (zero variance means equal)
    ])
    valid = torch.tensor([True, True, True, True, True, True, True, False, True, False, True, True,
                          True, False, False, False, False, False, True, True, True])
    got = informative_groups(scores, valid, 3)
    assert got.tolist() == [False, True, True, False, False, False, True]
    # a score that is NaN but marked valid (it cannot be compared) counts as unscored
    assert informative_groups(torch.tensor([1.0, NAN]), torch.tensor([True, True]), 2).tolist() == [False]
    with pytest.raises(ValueError, match="not divisible by group_size"):
        informative_groups(torch.zeros(5), torch.ones(5, dtype=torch.bool), 2)


def _cfg(**algorithm) -> JobConfig:
    return JobConfig.model_validate({
        "data": {"train": "unused.jsonl"}, "reward": {"function": "unused:fn"},
        "algorithm": {"name": "grpo", "group_size": 2, "dynamic_sampling": True, **algorithm},
        "schedule": {"prompts_per_step": 3},
    })


def _round(first: int, group_scores: list[list[float | None]], start: float) -> tuple[list, RolloutTimings]:
    """One round's scored chunks: prompt positions first, first + 1, ...; two chunks, split mid-round, each with a
    per-sample tensor (like ref_logp), a list, and a dict of lists (like reward_parts)."""
    completions, scores, positions = [], [], []
    for k, group in enumerate(group_scores):
        for j, s in enumerate(group):
            completions.append(Completion(f"s1-p{first + k}", j, [1], [2, 3], [-0.1, -0.2], "stop", 0))
            scores.append(s)
            positions.append(first + k)
    n = len(completions)
    marker = torch.tensor([[100.0 * p + c.sample_index] for p, c in zip(positions, completions, strict=True)])

    def result(lo: int, hi: int) -> dict:
        return {"scores": scores[lo:hi], "positions": positions[lo:hi], "rows": [p + 1000 for p in positions[lo:hi]],
                "ref_logp": marker[lo:hi], "logp": None, "reward_parts": {"acc": scores[lo:hi]}}

    half = n // 2
    chunks = [(completions[:half], result(0, half)), (completions[half:], result(half, n))]
    return chunks, RolloutTimings(start, start + 1.0, [(start + 0.5, start + 1.5)])


def test_fill_step_refills_until_the_step_is_full_and_keeps_the_first_informative_groups() -> None:
    cfg = _cfg(max_gen_batches=4)
    rounds = {
        1: [[0.0, 1.0], [0.0, 0.0], [0.5, 0.5]],   # positions 3, 4, 5: one informative (3)
        2: [[1.0, 0.0], [0.2, 0.1], [0.0, 1.0]],   # positions 6, 7, 8: all three; 8 is surplus
    }
    asked = []

    def draw(r: int):
        asked.append(r)
        scored, timings = _round(3 * r, rounds[r], start=10.0 * r)
        return scored, timings, 0.25

    first, timings = _round(0, [[1.0, 1.0], [None, 0.0], [0.0, 0.3]], start=0.0)  # position 2 only
    filled = fill_step(cfg, first, timings, 0.5, draw)
    assert asked == [1, 2]  # round 3 was not needed
    assert filled.train
    kept = sorted({p for _, res in filled.scored for p in res["positions"]})
    assert kept == [2, 3, 6]  # the first three informative groups, in draw order
    for completions, res in filled.scored:  # every per-sample entry was cut alike
        assert len(res["scores"]) == len(res["rows"]) == len(res["reward_parts"]["acc"]) == len(completions)
        assert res["ref_logp"].shape[0] == len(completions) and res["logp"] is None
        for c, p, m in zip(completions, res["positions"], res["ref_logp"][:, 0].tolist(), strict=True):
            assert c.request_id == f"s1-p{p}" and m == 100 * p + c.sample_index
    m = filled.metrics
    assert m["rollout/gen_rounds"] == 3 and m["rollout/drawn_groups"] == 9 and m["rollout/kept_groups"] == 3
    assert m["rollout/filtered_groups"] == 4  # positions 0, 1, 4, 5 (1: one scored sample)
    assert m["rollout/informative_frac"] == 1.0
    drawn = [1, 1, 0, 0, .3, 0, 1, 0, 0, .5, .5, 1, 0, .2, .1, 0, 1]
    assert m["rollout/drawn_reward_mean"] == pytest.approx(sum(drawn) / len(drawn))
    assert m["rollout/drawn_samples"] == 18 and m["rollout/drawn_failed"] == 1  # the failed budget sees every round
    assert filled.rollout_s == pytest.approx(3.0) and filled.wait_s == pytest.approx(1.0)
    assert filled.timings.gen_start == 0.0 and filled.timings.gen_end == 21.0 and len(filled.timings.score_intervals) == 3


def test_fill_step_trains_short_on_whole_rank_splits_when_the_rounds_run_out() -> None:
    def draw(r: int):
        return (*_round(3 * r, [[0.0, 1.0], [1.0, 1.0], [1.0, 1.0]], start=0.0), 0.0)

    first, timings = _round(0, [[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]], start=0.0)
    filled = fill_step(_cfg(max_gen_batches=2), first, timings, 0.0, draw)
    assert filled.train and sorted({p for _, res in filled.scored for p in res["positions"]}) == [1, 3]
    assert filled.metrics["rollout/informative_frac"] == pytest.approx(2 / 3)

    # 4 policy ranks and groups of 2: kept groups come in pairs, so 3 informative groups train as 2
    cfg = _cfg(max_gen_batches=3)
    cfg.trainer.policy.num_ranks = 4
    assert whole_groups_unit(cfg) == 2
    filled = fill_step(cfg, first, timings, 0.0, lambda r: (*_round(3 * r, [[0.0, 1.0], [1.0, 1.0], [1.0, 1.0]], 0.0), 0.0))
    assert filled.metrics["rollout/gen_rounds"] == 3 and filled.metrics["rollout/kept_groups"] == 2
    assert sorted({p for _, res in filled.scored for p in res["positions"]}) == [1, 3]


def test_fill_step_without_any_informative_group_makes_no_update() -> None:
    first, timings = _round(0, [[0.0, 0.0], [1.0, 1.0], [None, None]], start=0.0)
    filled = fill_step(_cfg(max_gen_batches=2), first, timings, 0.0,
                       lambda r: (*_round(3 * r, [[0.0, 0.0], [0.0, 0.0], [0.0, None]], 0.0), 0.0))
    assert not filled.train
    assert sum(len(c) for c, _ in filled.scored) == 12  # every sample drawn, for the step's figures
    assert filled.metrics["rollout/kept_groups"] == 0 and filled.metrics["rollout/informative_frac"] == 0
    assert filled.metrics["rollout/filtered_groups"] == 6
    assert math.isclose(filled.metrics["rollout/drawn_reward_mean"], 2 / 9)


def test_episode_turn_rewards_and_failed_environments_count_in_the_filter() -> None:
    chunks, _ = _round(0, [[0.0, 0.0], [0.0, 0.0]], start=0.0)
    completions = [c for chunk, _ in chunks for c in chunk]
    completions[0].turn_rewards = [(0, 0.5)]  # group 0 now differs by its turn reward
    completions[2].turn_rewards = [(0, 0.5)]
    completions[2].env_error = "crashed"      # group 1: the differing sample's environment failed
    assert informative_positions(chunks, 2) == ([0], [0, 1])


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="group_size >= 2"):
        JobConfig.model_validate({"data": {"train": "x.jsonl"}, "reward": {"function": "a:b"},
                                  "algorithm": {"name": "reinforce_pp", "dynamic_sampling": True}})
    with pytest.raises(ValueError, match="offline"):
        JobConfig.model_validate({"algorithm": {"name": "dpo", "dynamic_sampling": True}})
    with pytest.raises(ValueError, match="max_gen_batches"):
        _cfg(max_gen_batches=0)
    ppo = JobConfig.model_validate({"data": {"train": "x.jsonl"}, "reward": {"function": "a:b"},
                                    "model": {"critic": "tiny"}, "trainer": {"critic": {"num_ranks": 3}},
                                    "schedule": {"prompts_per_step": 3},
                                    "algorithm": {"name": "ppo", "group_size": 2, "dynamic_sampling": True}})
    assert whole_groups_unit(ppo) == 3  # the critic's ranks count too


def test_the_failure_budget_counts_the_dropped_groups_too() -> None:
    """Groups whose samples could not be scored have no signal and are dropped; their failures still count."""
    from rayrlhf.orchestrator.faults import FailureBudget

    row = {"step": 1, "reward/failed": 0, "rollout/samples": 16, "rollout/drawn_samples": 48, "rollout/drawn_failed": 30}
    message = FailureBudget(max_frac=0.5, window=1).over(row)
    assert message and "30 of 48 samples" in message
    assert FailureBudget(0.5, 1).over({**row, "rollout/drawn_failed": 20}) is None

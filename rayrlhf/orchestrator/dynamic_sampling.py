"""DAPO's dynamic sampling (`algorithm.dynamic_sampling`): a step trains only on prompt groups whose scores differ.

    round 1  <- the step's own batch: prompts_per_step prompts, launched like any other (k steps ahead when async)
    while fewer than prompts_per_step groups are informative and rounds < algorithm.max_gen_batches:
        round r <- prompts_per_step more rows from the data at its current position, at step positions
                   (r-1)*P .. r*P-1, generated and scored now, on the pipeline's one thread, with the weights the
                   workers hold (on-policy: the step's own; asynchronous: newer than round 1's)
    kept     <- the first prompts_per_step informative groups in draw order; when the rounds ran out, every
                informative group, rounded down to whole groups whose samples split over the trainer ranks

A group is informative when at least two of its scored samples have different raw scores: the reward (weighted
functions summed) plus an episode's turn rewards, before reward.clip / reward.normalize, the KL penalty and the
overlong penalties (these shape a score; they do not say whether the prompt was solved). Unscored samples never
make a group informative (`algorithms.informative_groups`).

Resume stays exact: refills are drawn at a fixed point of the loop (right after the step takes its batch, before
its update), so the data position they read is the same in a resumed run (in asynchronous mode it lies after the
draws of the steps launched ahead, which a resumed run launches at the same points); their request ids and seeds
come from (step, position), positions past prompts_per_step; and a refill is over before the step's checkpoint,
which therefore holds the data position after it and, as ever, only whole launched batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rayrlhf.algorithms import informative_groups
from rayrlhf.config import JobConfig
from rayrlhf.orchestrator.pipeline import Scored
from rayrlhf.orchestrator.rollout import RolloutTimings

# draw(round) -> (scored, timings, seconds waited): generate and score round `round` (1, 2, ...) of the step
Draw = Callable[[int], tuple[Scored, RolloutTimings, float]]


@dataclass
class Filled:
    """A step's samples after dynamic sampling."""

    scored: Scored  # the kept groups; every sample drawn when no group was informative (then `train` is False)
    timings: RolloutTimings  # all rounds': from the first one's start to the last one's end
    rollout_s: float  # generation time summed over the rounds
    wait_s: float
    train: bool  # False: no informative group at all, the step makes no update
    metrics: dict[str, float]


def raw_scores(scored: Scored) -> dict[int, dict[int, float | None]]:
    """Each sample's raw score by step position and sample index: reward plus turn rewards; None when unscored."""
    out: dict[int, dict[int, float | None]] = {}
    for completions, res in scored:
        for i, c in enumerate(completions):
            score = res["scores"][i]
            value = None if score is None or c.env_error is not None else float(score) + c.env_reward
            out.setdefault(int(res["positions"][i]), {})[c.sample_index] = value
    return out


def informative_positions(scored: Scored, group_size: int) -> tuple[list[int], list[int]]:
    """(positions of the informative groups, positions of every group), both in draw order."""
    per = raw_scores(scored)
    positions = sorted(per)
    if not positions:
        return [], []
    values = []
    for p in positions:
        if len(per[p]) != group_size:
            raise RuntimeError(f"the group at step position {p} has {len(per[p])} samples, not algorithm.group_size = {group_size}")
        values += [per[p][j] for j in sorted(per[p])]
    scores = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64)
    keep = informative_groups(scores, torch.tensor([v is not None for v in values]), group_size)
    return [p for p, k in zip(positions, keep.tolist(), strict=True) if k], positions


def _take(key: str, value: Any, idx: list[int]) -> Any:
    """Rows `idx` of one per-sample entry of a scoring result (a tensor, a list, a dict of them, or None)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value[idx]
    if isinstance(value, dict):
        return {k: _take(f"{key}.{k}", v, idx) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [value[i] for i in idx]
    raise TypeError(f"dynamic sampling cannot split the scoring result {key!r} ({type(value).__name__}) by sample")


def keep_groups(scored: Scored, positions: set[int]) -> Scored:
    """The samples of the groups at `positions`, with their scoring results (every per-sample entry) cut to match."""
    out = []
    for completions, res in scored:
        idx = [i for i in range(len(completions)) if res["positions"][i] in positions]
        if idx:
            out.append(([completions[i] for i in idx], {k: _take(k, v, idx) for k, v in res.items()}))
    return out


def whole_groups_unit(cfg: JobConfig) -> int:
    """The fewest groups whose samples split evenly over every trainer group's ranks: a short step keeps a multiple
    of it (any mini-batch of trainer.mini_batch_size splits already, so then does the remainder)."""
    ranks = [cfg.trainer.policy.num_ranks] + ([cfg.trainer.critic.num_ranks] if cfg.algorithm.name == "ppo" else [])
    unit = 1
    for r in ranks:
        unit = math.lcm(unit, r // math.gcd(r, cfg.algorithm.group_size))
    return unit


def fill_step(cfg: JobConfig, scored: Scored, timings: RolloutTimings, wait_s: float, draw: Draw) -> Filled:
    """Drop the step's uninformative groups and draw more rounds until prompts_per_step groups are informative or
    algorithm.max_gen_batches rounds were generated (see the module docstring)."""
    want, group_size = cfg.schedule.prompts_per_step, cfg.algorithm.group_size
    chunks, rounds = list(scored), [timings]
    informative, drawn = informative_positions(chunks, group_size)
    while len(informative) < want and len(rounds) < cfg.algorithm.max_gen_batches:
        more, more_timings, waited = draw(len(rounds))
        chunks += more
        rounds.append(more_timings)
        wait_s += waited
        informative, drawn = informative_positions(chunks, group_size)
    kept = informative[:want]
    kept = kept[: len(kept) - len(kept) % whole_groups_unit(cfg)]
    drawn_scores = [v for group in raw_scores(chunks).values() for v in group.values()]
    every = [v for v in drawn_scores if v is not None]
    metrics = {
        "rollout/gen_rounds": len(rounds),
        "rollout/drawn_groups": len(drawn),
        "rollout/filtered_groups": len(drawn) - len(informative),  # all scores equal: no signal
        "rollout/kept_groups": len(kept),
        "rollout/informative_frac": len(kept) / want,  # < 1: the rounds ran out, the step trains short
        "rollout/drawn_reward_mean": sum(every) / len(every) if every else math.nan,  # every round, kept or not
        "rollout/drawn_samples": len(drawn_scores),
        "rollout/drawn_failed": len(drawn_scores) - len(every),  # unscored: what faults.max_failed_frac counts
    }
    merged = RolloutTimings(rounds[0].gen_start, rounds[-1].gen_end, [i for t in rounds for i in t.score_intervals])
    rollout_s = sum(t.gen_end - t.gen_start for t in rounds)
    if not kept:
        return Filled(chunks, merged, rollout_s, wait_s, False, metrics)
    return Filled(keep_groups(chunks, set(kept)), merged, rollout_s, wait_s, True, metrics)

"""Online evaluation: the current policy's responses to data.eval, scored by the training reward.

Run before the first step (step 0), every `schedule.eval_every` steps and after the last one.
Responses are greedy, sampled at the rollout temperature, or both (`schedule.eval_decoding`);
the same prompts get the same per-request seeds at every evaluation, so the figures compare the
policy over time and not the sampling noise. With `reward.eval_function` (a held-out "true"
metric, e.g. a rule while training against a learned reward model) every row also carries the
true score and the gap between the two, the first sign of reward over-optimisation.

Evaluation leaves the training run untouched: it uses its own request ids and seeds, draws from
no training RNG, does not move the data order, the KL controller or the reward normaliser, and
clears the engines' prefix caches afterwards so the next training step sees the same engines.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from rayrlhf.actors.types import Completion, GenerationRequest, SamplingSpec
from rayrlhf.algorithms.passk import sample_metrics
from rayrlhf.config import JobConfig
from rayrlhf.data.datasets import PromptDataset
from rayrlhf.orchestrator.episodes import episode_spec, reward_inputs
from rayrlhf.orchestrator.rollout import stream_rollouts

_EVAL_SEED_OFFSET = 7_000_003  # keeps evaluation seeds apart from the training ones


def eval_prompts(data: PromptDataset, cfg: JobConfig) -> list[int]:
    """Indices of the evaluation prompts: the first `schedule.eval_max_prompts` in file order, or, with
    `schedule.eval_subset_seed`, that many drawn with the seed (in file order; the same at every evaluation,
    so the figures still compare the policy over time, on prompts from the whole file)."""
    n = len(data) if cfg.schedule.eval_max_prompts is None else min(len(data), cfg.schedule.eval_max_prompts)
    if cfg.schedule.eval_subset_seed is None:
        return list(range(n))
    picked = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.schedule.eval_subset_seed))[:n]
    return sorted(int(i) for i in picked)


def eval_max_new_tokens(cfg: JobConfig) -> int:
    """The evaluation's response limit: `schedule.eval_max_new_tokens`, else `rollout.max_new_tokens`."""
    return cfg.schedule.eval_max_new_tokens or cfg.rollout.max_new_tokens


def _modes(cfg: JobConfig) -> list[str]:
    return ["greedy", "sampled"] if cfg.schedule.eval_decoding == "both" else [cfg.schedule.eval_decoding]


def evaluate(system: Any, data: PromptDataset, cfg: JobConfig, step: int, stop_ids: tuple[int, ...],
             tools: list[dict] | None = None) -> dict[str, float]:
    """One evaluation pass; returns the `eval/...` figures of the metrics row of `step`.

    Greedy responses are one per prompt; sampled ones `schedule.eval_samples` per prompt, giving mean@n and
    pass@k. With an environment each sample is an episode, scored like in training (its turn rewards plus the
    reward function on its transcript; an episode whose environment failed is unscored)."""
    t0 = time.monotonic()
    r = cfg.rollout
    requests, where = [], {}
    for mode in _modes(cfg):
        temperature, n = (0.0, 1) if mode == "greedy" else (r.temperature, cfg.schedule.eval_samples)
        for i in eval_prompts(data, cfg):
            spec = SamplingSpec(n=n, temperature=temperature, top_p=r.top_p, top_k=r.top_k,
                                max_new_tokens=eval_max_new_tokens(cfg), stop_token_ids=stop_ids,
                                seed=(cfg.seed * 1_000_003 + _EVAL_SEED_OFFSET + i) % (2**31 - 1))
            request_id = f"eval{step}-{mode}-{i}"
            where[request_id] = (mode, i)
            requests.append(GenerationRequest(request_id, list(data.prompt_ids[i]), spec,
                                              episode=episode_spec(cfg, data.rows[i], tools)))

    def score(batch: list[Completion]) -> dict[str, list]:
        out = system.score_reward(batch, reward_inputs(batch, [data.rows[where[c.request_id][1]] for c in batch]))
        out["scores"] = [None if s is None or c.env_error is not None else s + c.env_reward
                         for s, c in zip(out["scores"], batch, strict=True)]
        return out

    scored, _ = stream_rollouts(system.pool, requests, score, cfg.rollout.micro_batch_size, rejoin=system.rejoin_worker,
                                label=f"the evaluation at step {step}", expected_version=system.synced_version)
    system.reset_prefix_caches()
    out: dict[str, float] = {}
    for mode in _modes(cfg):
        picked = [(c, res, j) for batch, res in scored for j, c in enumerate(batch) if where[c.request_id][0] == mode]
        out.update({f"eval/{mode}/{k}": v for k, v in _figures(picked).items()})
        if mode == "sampled" and cfg.schedule.eval_samples > 1:
            groups: dict[str, list[float | None]] = {}
            for c, res, j in picked:
                groups.setdefault(c.request_id, []).append(res["scores"][j])
            figures = sample_metrics(list(groups.values()), cfg.schedule.eval_pass_k, cfg.schedule.eval_pass_threshold)
            out.update({f"eval/sampled/{k}": v for k, v in figures.items() if k != "prompts"})
    first = f"eval/{_modes(cfg)[0]}/"  # the headline figures (eval/reward_mean, ...) are the first mode's
    out.update({"eval/" + k.removeprefix(first): v for k, v in list(out.items()) if k.startswith(first)})
    out["timing/eval_s"] = time.monotonic() - t0
    return out


def _figures(picked: list[tuple[Completion, dict[str, list], int]]) -> dict[str, float]:
    scores = [res["scores"][j] for _, res, j in picked]
    valid = [s for s in scores if s is not None]
    lengths = torch.tensor([float(len(c.response_ids)) for c, _, _ in picked])
    figures = {
        "reward_mean": sum(valid) / len(valid) if valid else math.nan,
        **({"turns_mean": sum((c.env_info or {}).get("turns", 0.0) for c, _, _ in picked) / len(picked)}
           if picked and picked[0][0].turns is not None else {}),
        "reward_std": float(torch.tensor(valid).std()) if len(valid) > 1 else 0.0,
        "failed_frac": 1.0 - len(valid) / len(scores) if scores else 0.0,
        "response_length_mean": float(lengths.mean()) if len(lengths) else 0.0,
        "truncated_frac": sum(c.truncated for c, _, _ in picked) / max(len(picked), 1),
        "samples": float(len(picked)),
    }
    if picked and "true_scores" in picked[0][1]:
        true = [res["true_scores"][j] for _, res, j in picked]
        both = [(s, t) for s, t in zip(scores, true, strict=True) if s is not None and t is not None]
        figures["true_reward_mean"] = sum(t for _, t in both) / len(both) if both else math.nan
        figures["reward_gap"] = figures["reward_mean"] - figures["true_reward_mean"] if both else math.nan
    return figures

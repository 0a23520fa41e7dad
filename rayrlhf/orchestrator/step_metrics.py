"""One training step's figures: the `metrics.jsonl` row's reward, KL, length, rollout and timing keys.

Computed from the assembled batch and its advantages (orchestrator/batch.py, orchestrator/experience.py), with
the figures of a multi-turn step (`env/...`, `response/{policy,env}_tokens_mean`). The loop adds what only it
knows: the step, the weight version, the data position and the trainers' own metrics.
"""

from __future__ import annotations

from typing import Any

import torch

from rayrlhf.algorithms import explained_variance, masked_mean
from rayrlhf.orchestrator.batch import episode_metrics
from rayrlhf.orchestrator.experience import kl_per_sequence, kl_token_mean, logprob_mismatch


def _mean(values: list[float | None]) -> float:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else float("nan")


def sampled_gap(exp: dict[str, Any], comparable: bool) -> dict[str, float]:
    """The engine's sampling log-probs against the trainer's on the sampled tokens: the engine/trainer mismatch when
    the two are comparable (on-policy, unprocessed sampling); else the distance of the behaviour distribution (stale
    weights, top-p/top-k, min_new_tokens) from the policy being trained, under its own name."""
    gap = logprob_mismatch(exp["sample_logp"], exp["logp"], exp["mask"])
    if comparable:
        return gap
    return {"rollout/behaviour_kl": gap["rollout/logprob_mismatch"], "rollout/behaviour_max_diff": gap["rollout/logprob_max_diff"]}


def step_row(exp: dict[str, Any], adv: Any, kl_coef: float, timings: Any, rollout_s: float,
             comparable_logprobs: bool) -> dict[str, Any]:
    """The step's figures from its batch `exp`, advantages `adv` and rollout `timings`."""
    mask = exp["mask"] * exp["valid"].float().unsqueeze(1)
    valid = exp["valid"]
    total = exp["scores"] + exp["turn_rewards"].sum(dim=1) if "turn_rewards" in exp else exp["scores"]
    row: dict[str, Any] = {
        "reward/mean": float(total[valid].mean()) if valid.any() else float("nan"),
        "reward/std": float(total[valid].std()) if valid.sum() > 1 else 0.0,
        "reward/failed": int(torch.isnan(exp["scores"]).sum()),  # not scored (failed episodes: env/failed)
        **{f"reward/{name}": _mean(values) for name, values in exp["reward_parts"].items()},
        **episode_metrics(exp["completions"], exp["mask"]),
        "kl/mean": kl_token_mean(adv.kl, mask) if "ref_logp" in exp else float("nan"),  # null: no KL computed
        "kl/seq_mean": kl_per_sequence(adv.kl, mask) if "ref_logp" in exp else float("nan"),
        "response/length_mean": float(exp["response_len"].mean()),
        "response/truncated_frac": float(exp["truncated"].float().mean()),
        "rollout/samples": len(exp["versions"]),
        "rollout/min_weight_version": min(exp["versions"]),
        **(sampled_gap(exp, comparable_logprobs) if "logp" in exp else {}),
        "advantages/mean": float(masked_mean(adv.advantages, mask)),
        "throughput/tokens_per_s": float(exp["response_len"].sum()) / max(rollout_s, 1e-9),
        "timing/rollout_s": rollout_s,
        "timing/score_s": timings.score_s,
        "timing/overlap_frac": timings.overlap_frac,
    }
    if adv.returns is not None:
        row["critic/explained_variance"] = float(explained_variance(exp["values"], adv.returns, mask))
    if "entropy" in exp:  # else the update's own forward reports it (policy/entropy)
        row["policy/entropy"] = float(masked_mean(exp["entropy"], mask))
    return row

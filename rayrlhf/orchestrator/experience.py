"""From scored rollouts to training targets: the advantage step of every online algorithm.

Pure torch on dense [B, T] tensors (layout in `rayrlhf.models.forward`), so the whole
algorithm choice is visible in one function, `compute_advantages`, and tested without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rayrlhf.algorithms import (
    gae,
    group_advantages,
    kl_estimate,
    masked_mean,
    masked_whiten,
    reinforce_pp_advantages,
    rloo_advantages,
    token_rewards,
)
from rayrlhf.config import AlgorithmConfig


@dataclass
class Advantages:
    """Targets for one step: advantages [B, T], critic returns [B, T] (ppo only) and diagnostics."""

    advantages: torch.Tensor
    returns: torch.Tensor | None
    kl: torch.Tensor
    rewards: torch.Tensor
    scores: torch.Tensor


def fill_invalid_with_group_mean(scores: torch.Tensor, valid: torch.Tensor, group_size: int) -> torch.Tensor:
    """Replace unscorable samples by their group's mean valid score.

    The sample itself is masked out of the loss; filling it with the mean keeps it from
    shifting its siblings' baseline. A group with no valid sample gets 0 everywhere.
    """
    groups = scores.reshape(-1, group_size)
    ok = valid.reshape(-1, group_size).to(scores.dtype)
    count = ok.sum(dim=1, keepdim=True)
    mean = (torch.nan_to_num(groups) * ok).sum(dim=1, keepdim=True) / count.clamp_min(1)
    return torch.where(ok.bool(), groups, mean.expand_as(groups)).reshape(-1)


def compute_advantages(
    cfg: AlgorithmConfig,
    scores: torch.Tensor,
    valid: torch.Tensor,
    truncated: torch.Tensor,
    mask: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    values: torch.Tensor | None,
    kl_coef: float,
) -> Advantages:
    """Advantages for `cfg.name` from sequence scores [B] and per-token log-probs [B, T].

    - the KL to the reference is estimated per token; with `kl_as_reward` it is paid as a
      per-token reward penalty −β·KL (InstructGPT), otherwise it goes into the loss (GRPO);
    - ppo: GAE over token rewards with the critic's values;
    - grpo / rloo: sequence rewards (the score, minus β·ΣKL when the KL is a reward) normalised
      within each prompt's group;
    - reinforce_pp: discounted reward-to-go of token rewards, whitened over the batch.
    `valid` is False for samples the reward could not score: their mask is zeroed, so they
    contribute nothing to any loss. `truncated` samples pay `cfg.overlong_penalty`.
    """
    mask = mask * valid.to(mask.dtype).unsqueeze(1)
    scores = torch.where(valid, torch.nan_to_num(scores), torch.zeros_like(scores))
    scores = scores - cfg.overlong_penalty * truncated.to(scores.dtype)
    kl = kl_estimate(logp, ref_logp, cfg.kl_estimator) * mask
    beta = kl_coef if cfg.kl_as_reward else 0.0
    rewards = token_rewards(scores, kl, mask, beta)
    returns = None
    if cfg.name == "ppo":
        if values is None:
            raise ValueError("ppo needs the critic's values")
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
    elif cfg.name in ("grpo", "rloo"):
        sequence_reward = fill_invalid_with_group_mean(rewards.sum(dim=1), valid, cfg.group_size)
        if cfg.name == "grpo":
            per_sequence = group_advantages(sequence_reward, cfg.group_size, scale_by_std=cfg.scale_by_std)
        else:
            per_sequence = rloo_advantages(sequence_reward, cfg.group_size)
        advantages = per_sequence.unsqueeze(1) * mask
    elif cfg.name == "reinforce_pp":
        advantages = reinforce_pp_advantages(rewards, mask, cfg.gamma)
    else:
        raise ValueError(f"algorithm.name={cfg.name} is not an online RL algorithm")
    return Advantages(advantages=advantages * mask, returns=returns, kl=kl, rewards=rewards, scores=scores)


def kl_per_sequence(kl: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over sequences of the summed per-token KL (what the adaptive controller targets)."""
    rows = mask.sum(dim=1) > 0
    return float((kl * mask).sum(dim=1)[rows].mean()) if rows.any() else 0.0


def kl_token_mean(kl: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean per-token KL over all response tokens (the `kl/mean` metric)."""
    return float(masked_mean(kl, mask))

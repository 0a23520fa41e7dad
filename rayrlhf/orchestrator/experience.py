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
    soft_overlong_penalty,
    token_rewards,
)
from rayrlhf.config import AlgorithmConfig


@dataclass
class Advantages:
    """Targets for one step: advantages [B, T], critic returns [B, T] (ppo only) and diagnostics.

    `loss_mask` [B, T] is the tokens the update trains on: the response tokens of scored samples,
    without truncated ones under `algorithm.overlong_filter`. `overlong_penalty` [B] is the soft
    overlong penalty each sample's score received (<= 0; 0 when disabled or unscored).
    """

    advantages: torch.Tensor
    returns: torch.Tensor | None
    kl: torch.Tensor
    rewards: torch.Tensor
    scores: torch.Tensor
    loss_mask: torch.Tensor | None = None
    overlong_penalty: torch.Tensor | None = None


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
    ref_logp: torch.Tensor | None,
    values: torch.Tensor | None,
    kl_coef: float,
    response_len: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    turn_rewards: torch.Tensor | None = None,
) -> Advantages:
    """Advantages for `cfg.name` from sequence scores [B] and per-token log-probs [B, T].

    - the KL to the reference is estimated per token; with `kl_as_reward` it is paid as a
      per-token reward penalty −β·KL (InstructGPT), otherwise it goes into the loss (GRPO);
    - ppo: GAE over token rewards with the critic's values;
    - grpo / rloo: sequence rewards (the score, minus β·ΣKL when the KL is a reward) normalised
      within each prompt's group;
    - reinforce_pp: discounted reward-to-go of token rewards, whitened over the batch.
    `valid` is False for samples the reward could not score: their mask is zeroed, so they
    contribute nothing to any loss. `truncated` samples pay `cfg.overlong_penalty`; with
    `cfg.overlong_buffer` every sample pays DAPO's soft penalty on its `response_len` (default: its
    mask's token count) against `max_new_tokens`. With `cfg.overlong_filter` truncated samples are
    left out of `loss_mask` (their advantages are 0) but, as in DAPO, still count in their group's
    baseline: the other samples' advantages do not depend on whether the filter is on.
    Multi-turn episodes: `mask` is the loss mask (the policy's tokens; GAE and reward-to-go run over
    those alone, the environment's neither earn nor discount), and `turn_rewards` [B, T] add each
    turn's reward on that turn's last policy token, beside the score on the last one.
    """
    mask = mask * valid.to(mask.dtype).unsqueeze(1)
    scores = torch.where(valid, torch.nan_to_num(scores), torch.zeros_like(scores))
    scores = scores - cfg.overlong_penalty * truncated.to(scores.dtype)
    soft = torch.zeros_like(scores)
    if cfg.overlong_buffer > 0:
        if max_new_tokens is None:
            raise ValueError("algorithm.overlong_buffer > 0 needs the length limit (max_new_tokens)")
        lengths = response_len if response_len is not None else mask.sum(dim=1)
        soft = torch.where(valid, soft_overlong_penalty(lengths, max_new_tokens, cfg.overlong_buffer,
                                                        cfg.overlong_penalty_factor).to(scores.dtype), soft)
        scores = scores + soft
    loss_mask = mask * (~truncated).to(mask.dtype).unsqueeze(1) if cfg.overlong_filter else mask
    kl = kl_estimate(logp, ref_logp, cfg.kl_estimator) * mask if ref_logp is not None else torch.zeros_like(mask)
    beta = kl_coef if cfg.kl_as_reward else 0.0
    rewards = token_rewards(scores, kl, mask, beta)
    if turn_rewards is not None:
        rewards = rewards + torch.where(mask != 0, turn_rewards.to(rewards.dtype), torch.zeros_like(rewards))
    returns = None
    if cfg.name == "ppo":
        if values is None:
            raise ValueError("ppo needs the critic's values")
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:  # over the tokens that train
            advantages = masked_whiten(advantages, loss_mask)
    elif cfg.name in ("grpo", "rloo"):
        sequence_reward = fill_invalid_with_group_mean(rewards.sum(dim=1), valid, cfg.group_size)
        if cfg.name == "grpo":
            per_sequence = group_advantages(sequence_reward, cfg.group_size, scale_by_std=cfg.scale_by_std)
        else:
            per_sequence = rloo_advantages(sequence_reward, cfg.group_size)
        advantages = per_sequence.unsqueeze(1) * mask
    elif cfg.name == "reinforce_pp":
        advantages = reinforce_pp_advantages(rewards, loss_mask, cfg.gamma)  # rows are independent: whitened over what trains
    else:
        raise ValueError(f"algorithm.name={cfg.name} is not an online RL algorithm")
    return Advantages(advantages=advantages * loss_mask, returns=returns, kl=kl, rewards=rewards, scores=scores,
                      loss_mask=loss_mask, overlong_penalty=soft)


class RunningMoments:
    """Running mean and variance of scores over the whole run (Chan et al.'s parallel update), checkpointed."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    def update(self, values: torch.Tensor) -> None:
        values = values.double()
        n = float(values.numel())
        if n == 0:
            return
        mean, m2 = float(values.mean()), float(((values - values.mean()) ** 2).sum())
        delta, total = mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / max(self.count - 1.0, 1.0)) ** 0.5

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])


def shape_scores(
    scores: torch.Tensor, valid: torch.Tensor, clip: float | None, normalize: str, moments: RunningMoments | None = None,
) -> torch.Tensor:
    """Scores as the advantages see them: clipped to [-clip, clip], then normalised.

    `normalize`: "none"; "batch" (zero mean, unit std over this step's scored samples); "running"
    (by the mean and std of every scored sample so far, `moments` updated with this step's first).
    Unscored samples keep their NaN: the advantage step masks them out.
    """
    out = scores.clone()
    ok = valid & torch.isfinite(scores)
    if clip is not None:
        out[ok] = out[ok].clamp(-clip, clip)
    if normalize == "batch" and int(ok.sum()) > 1:
        out[ok] = (out[ok] - out[ok].mean()) / (out[ok].std() + 1e-8)
    elif normalize == "running":
        if moments is None:
            raise ValueError("reward.normalize=running needs the run's RunningMoments")
        moments.update(out[ok])
        out[ok] = (out[ok] - moments.mean) / (moments.std + 1e-8)
    elif normalize not in ("none", "batch"):
        raise ValueError(f"unknown reward normalisation {normalize!r}")
    return out


def kl_per_sequence(kl: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over sequences of the summed per-token KL (what the adaptive controller targets)."""
    rows = mask.sum(dim=1) > 0
    return float((kl * mask).sum(dim=1)[rows].mean()) if rows.any() else 0.0


def controller_kl(kl: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor) -> tuple[float, int]:
    """(mean summed KL per scored sequence, scored samples): what the adaptive KL controller is fed.

    Unscored samples are masked out of the update and their KL was zeroed; counting them would
    pull the controller's reading towards 0.
    """
    scored = mask * valid.to(mask.dtype).unsqueeze(1)
    return kl_per_sequence(kl, scored), int(valid.sum())


def kl_token_mean(kl: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean per-token KL over all response tokens (the `kl/mean` metric)."""
    return float(masked_mean(kl, mask))


def logprob_mismatch(sample_logp: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How far the engine that sampled is from the trainer, on the same tokens and weights.

    `rollout/logprob_mismatch` is the k3 estimate of KL(engine ‖ trainer) per token (the tokens
    were drawn from the engine); `rollout/logprob_max_diff` the largest |difference|. Both are ~0
    when engine and trainer compute the same distribution; kernels, dtypes or a stale weight
    sync make them grow, and then PPO's ratios are off-policy without anyone having asked for it.
    """
    mask = mask.to(logp.dtype)
    kl = kl_estimate(sample_logp.to(logp.dtype), logp, "k3")
    diff = torch.where(mask != 0, (sample_logp - logp).abs(), torch.zeros_like(logp))
    return {"rollout/logprob_mismatch": float(masked_mean(kl, mask)), "rollout/logprob_max_diff": float(diff.max())}

"""Reward shaping and advantage estimators: GAE (PPO), GRPO, RLOO and REINFORCE++.

Conventions: ``B`` rows, ``T`` response tokens, ``mask`` is 1 on response tokens and 0 on
right padding; sequence-level inputs are ``[B]``. Advantages are targets, never something to
differentiate through, so every estimator here runs without autograd and returns detached
tensors that are exactly 0 on padding.
"""

from __future__ import annotations

import torch

from .utils import masked_whiten

__all__ = [
    "soft_overlong_penalty",
    "token_rewards",
    "gae",
    "group_advantages",
    "rloo_advantages",
    "informative_groups",
    "reinforce_pp_returns",
    "reinforce_pp_advantages",
]


def _last_token_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of each row's last response token, and whether the row has any response token."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    last = torch.where(mask != 0, positions, torch.full_like(positions, -1)).amax(dim=-1)
    return last.clamp_min(0), last >= 0


@torch.no_grad()
def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float | torch.Tensor
) -> torch.Tensor:
    """Dense per-token reward ``-kl_coef * kl`` plus the sequence score on the last response token.

    This is the InstructGPT/Ziegler reward: the reward model scores the whole response once,
    the KL penalty is paid per token. A row whose mask is all zero (empty response) gets no
    score and an all-zero reward row.
    """
    mask = mask.to(kl.dtype)
    zero = torch.zeros((), dtype=kl.dtype, device=kl.device)
    rewards = torch.where(mask != 0, -kl_coef * kl, zero)
    last, has_tokens = _last_token_index(mask)
    placed = torch.where(has_tokens, scores.to(rewards.dtype), zero)
    return rewards.scatter_add(1, last.unsqueeze(1), placed.unsqueeze(1))


@torch.no_grad()
def soft_overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025): a score term ``<= 0`` per response ``[B]``.

    With ``L_max = max_len`` and ``L_cache = buffer``: 0 for ``L <= L_max - L_cache``, then a linear
    ramp ``(L_max - L_cache - L) / L_cache * factor`` down to ``-factor`` at ``L_max``, and ``-factor``
    beyond. A response cut at the limit is not necessarily wrong; the ramp tells the policy that it
    is getting long before the cut, instead of one cliff at the limit. ``buffer = 0`` disables it.
    """
    lengths = lengths.detach().to(torch.float32)
    if buffer <= 0:
        return torch.zeros_like(lengths)
    if buffer > max_len:
        raise ValueError(f"the overlong buffer ({buffer}) cannot exceed the length limit ({max_len})")
    ramp = (max_len - buffer - lengths) / buffer * factor
    return ramp.clamp(min=-factor, max=0.0)


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) over response tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V = 0`` after the last response token
    (the episode terminates there), ``A_t = delta_t + gamma * lam * A_{t+1}`` and
    ``returns = A + V`` (the critic's regression target). Both outputs are 0 on padding.
    Tokens with mask 0 inside a row (an environment's turn in a multi-turn episode) are skipped:
    ``t + 1`` is the next token with mask 1, so they neither earn nor discount.
    The reverse scan is over ``T`` only; all rows advance together.
    """
    rewards = rewards.detach()
    mask = mask.detach().to(rewards.dtype)
    values = values.detach().to(rewards.dtype) * mask
    rewards = torch.where(mask != 0, rewards, torch.zeros_like(rewards))
    num_tokens = rewards.shape[1]
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    reversed_adv = []
    for t in reversed(range(num_tokens)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        on = mask[:, t] != 0  # a masked-out token (padding, an environment's turn) is skipped, not a terminal
        next_adv = torch.where(on, adv, next_adv)
        next_value = torch.where(on, values[:, t], next_value)
        reversed_adv.append(adv * mask[:, t])
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    returns = (advantages + values) * mask
    return advantages, returns


def _grouped(scores: torch.Tensor, group_size: int, min_size: int, what: str) -> torch.Tensor:
    if scores.dim() != 1:
        raise ValueError(f"{what} expects sequence-level scores of shape [B], got {tuple(scores.shape)}")
    if group_size < min_size:
        raise ValueError(f"{what} needs group_size >= {min_size}, got {group_size}")
    if scores.shape[0] % group_size != 0:
        raise ValueError(
            f"{what}: batch size {scores.shape[0]} is not divisible by group_size {group_size}; "
            "rows must form contiguous groups of responses to the same prompt"
        )
    return scores.detach().reshape(-1, group_size)


def _zero_constant_groups(adv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Force exact zeros for groups whose scores are all equal (no learning signal).

    Rounding in the group mean would otherwise leave ~1e-8 residues that the std division
    can blow up to O(1) noise.
    """
    constant = (groups == groups[:, :1]).all(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(adv), adv)


@torch.no_grad()
def group_advantages(
    scores: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO outcome advantages (Shao et al. 2024): score minus its group mean, over the group std.

    Rows ``[k*group_size, (k+1)*group_size)`` are responses to the same prompt. The std is the
    unbiased one, so ``scale_by_std`` needs ``group_size >= 2``. ``scale_by_std=False`` is
    Dr. GRPO (Liu et al. 2025), which drops the std division to avoid favouring prompts that
    are too easy or too hard. Groups with equal scores give exactly 0. Returns ``[B]``.
    """
    groups = _grouped(scores, group_size, 2 if scale_by_std else 1, "group_advantages")
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return _zero_constant_groups(centred, groups).reshape(-1)


@torch.no_grad()
def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024): each score minus the mean of the others.

    The leave-one-out baseline is independent of the sample it corrects, so the estimator
    stays unbiased. Needs ``group_size >= 2``. Returns ``[B]``.
    """
    groups = _grouped(scores, group_size, 2, "rloo_advantages")
    others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return _zero_constant_groups(groups - others_mean, groups).reshape(-1)


@torch.no_grad()
def informative_groups(scores: torch.Tensor, valid: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which prompt groups carry a learning signal, for DAPO's dynamic sampling (Yu et al. 2025): ``[B / group_size]``
    booleans, True where at least two scored samples of the group have different scores.

    A group whose scores are all equal gets exactly zero group-relative advantage (GRPO, RLOO), so it only
    dilutes the batch. Unscored samples (``valid`` False, or a non-finite score) never make a group
    informative: they are left out of the update and stand in for their group's mean, so a group with
    one scored sample, or none, has no signal either. Scores are compared exactly (zero variance, not small).
    """
    groups = _grouped(scores, group_size, 1, "informative_groups")
    ok = valid.reshape(-1, group_size).bool() & torch.isfinite(groups)
    inf = torch.full_like(groups, float("inf"))
    high = torch.where(ok, groups, -inf).amax(dim=1)
    low = torch.where(ok, groups, inf).amin(dim=1)
    return (ok.sum(dim=1) >= 2) & (high > low)


@torch.no_grad()
def reinforce_pp_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Discounted reward-to-go ``G_t = r_t + gamma * G_{t+1}`` of token rewards; 0 on padding."""
    rewards = rewards.detach()
    mask = mask.detach().to(rewards.dtype)
    rewards = torch.where(mask != 0, rewards, torch.zeros_like(rewards))
    running = torch.zeros_like(rewards[:, 0])
    reversed_returns = []
    for t in reversed(range(rewards.shape[1])):  # masked-out tokens inside a row are skipped, as in `gae`
        running = torch.where(mask[:, t] != 0, rewards[:, t] + gamma * running, running)
        reversed_returns.append(running * mask[:, t])
    return torch.stack(reversed_returns[::-1], dim=1)


@torch.no_grad()
def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): reward-to-go whitened over all response tokens of the batch.

    Batch-level (not per-prompt) normalisation gives a critic-free baseline without requiring
    several samples per prompt. 0 on padding.
    """
    return masked_whiten(reinforce_pp_returns(rewards, mask, gamma), mask)

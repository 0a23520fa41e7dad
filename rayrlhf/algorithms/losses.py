"""Training losses: clipped PPO and GSPO policy losses, value loss, DPO, Bradley-Terry reward model, SFT (and PPO-ptx's NLL).

Token-level losses are reduced by :func:`aggregate_loss`, so every trainer can pick the same
aggregation mode (the choice matters: token-mean weights long responses more, Dr. GRPO's
constant normaliser removes the length bias of per-sequence means).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kl import kl_estimate
from .utils import masked_mean, masked_sum

__all__ = [
    "AGG_MODES",
    "aggregate_loss",
    "ppo_policy_loss",
    "gspo_policy_loss",
    "truncated_importance_weights",
    "sequence_importance_weights",
    "value_loss",
    "dpo_loss",
    "bradley_terry_loss",
    "sequence_logprob",
    "sft_nll_loss",
]

AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token-mean",
    agg_constant: float | None = None,
) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar.

    * ``token-mean``: mean over all response tokens in the batch.
    * ``seq-mean-token-mean``: each row's token mean, averaged over rows that have at least one
      response token (empty rows would otherwise dilute the loss).
    * ``seq-mean-token-sum-norm``: each row's token sum divided by ``agg_constant`` (default
      ``T = per_token.shape[1]``), averaged over all ``B`` rows (Dr. GRPO).

    ``agg_constant`` is ignored by the first two modes.
    """
    if agg == "token-mean":
        return masked_mean(per_token, mask)
    if agg == "seq-mean-token-mean":
        row_mean = masked_mean(per_token, mask, dim=-1)
        has_tokens = (mask != 0).any(dim=-1).to(per_token.dtype)
        return masked_mean(row_mean, has_tokens)
    if agg == "seq-mean-token-sum-norm":
        constant = float(per_token.shape[-1]) if agg_constant is None else float(agg_constant)
        if not constant > 0:
            raise ValueError(f"agg_constant must be > 0, got {agg_constant!r}")
        return (masked_sum(per_token, mask, dim=-1) / constant).mean()
    raise ValueError(f"unknown loss aggregation {agg!r}; valid modes are {list(AGG_MODES)}")


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    agg: str = "token-mean",
    agg_constant: float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective (Schulman et al. 2017), as a loss to minimise.

    Per token ``max(-A * r, -A * clip(r, 1 - clip_eps, 1 + clip_eps_high))`` with
    ``r = exp(logp - old_logp)``. ``clip_eps_high`` (default ``clip_eps``) allows DAPO-style
    asymmetric "clip-higher", which leaves low-probability tokens room to grow. ``advantages``
    may be ``[B, T]`` or sequence-level ``[B]`` (broadcast over tokens).

    Stats (detached): ``clipfrac`` (share of response tokens where the clipped term is strictly
    larger, i.e. the gradient is cut), ``approx_kl`` (token mean of the k3 estimate of
    KL(pi_old || pi_theta) on the pi_old samples, i.e. ``(r - 1) - log r``), ``ratio_mean``,
    ``ratio_max`` and ``loss``.

    ``weights`` [B, T] (detached) multiply each token's term: the truncated importance weights
    π_old / π_behaviour of decoupled PPO, when the samples came from older weights than π_old.
    """
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if clip_eps < 0 or clip_eps_high < 0:
        raise ValueError(f"clip ranges must be >= 0, got clip_eps={clip_eps}, clip_eps_high={clip_eps_high}")
    old_logp = old_logp.detach()
    advantages = advantages.detach()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.to(logp.dtype)
    valid = mask != 0
    log_ratio = torch.where(valid, logp - old_logp, torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps_high)
    per_token = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights.detach().to(per_token.dtype)
    loss = aggregate_loss(per_token, mask, agg, agg_constant)
    with torch.no_grad():
        mask_f = mask.to(logp.dtype)
        stats = {
            "loss": loss.detach(),
            "clipfrac": masked_mean((clipped > unclipped).to(logp.dtype), mask_f),
            "approx_kl": masked_mean(kl_estimate(old_logp, logp.detach(), "k3"), mask_f),
            "ratio_mean": masked_mean(ratio.detach(), mask_f),
            "ratio_max": torch.where(valid, ratio.detach(), torch.zeros_like(ratio)).max(),
        }
    return loss, stats


def _row_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's mean of ``x`` over its response tokens ``[B]`` (0 for a row without any)."""
    return masked_sum(x, mask, dim=-1) / (mask != 0).sum(dim=-1).clamp_min(1).to(x.dtype)


def gspo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 3e-4,
    clip_eps_high: float | None = None,
    agg: str = "seq-mean-token-mean",
    agg_constant: float | None = None,
    weights: torch.Tensor | None = None,
    token_level: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Group Sequence Policy Optimization (Zheng et al. 2025): the clip acts on whole sequences.

    Per row ``s_i = exp(mean_t(logp - old_logp))`` over its response tokens, the geometric mean of
    the token ratios: a sequence's likelihood ratio normalised by its length, so that long and short
    responses share one clip range. ``loss_i = max(-A_i * s_i, -A_i * clip(s_i, 1 - clip_eps,
    1 + clip_eps_high))``: a sequence is kept or cut as a whole, where PPO cuts single tokens and
    keeps the noisy per-token ratios of the rest. ``s_i`` stays far closer to 1 than token ratios,
    hence ranges of ~3e-4 / 4e-4 (the paper's) instead of PPO's 0.2.

    Each row's loss is spread over its tokens and reduced by ``agg`` (``aggregate_loss``):
    ``seq-mean-token-mean`` is the paper's mean over sequences, ``token-mean`` weights each sequence
    by its length, ``seq-mean-token-sum-norm`` by its length over ``agg_constant``.
    ``advantages`` are per sequence ``[B]``; a ``[B, T]`` tensor is read as its row means (exact when
    constant over each row, as group advantages are).

    ``token_level`` is GSPO-token: ``s_i,t = sg[s_i] * pi_t / sg[pi_t]`` has the value of ``s_i`` and,
    with advantages constant over a row, the same gradient, but admits per-token advantages
    ``[B, T]`` (GAE); the clip then applies per token, to the sequence's ratio.

    ``weights`` ([B], or [B, T] for token_level; detached) multiply each sequence's (token's) term:
    the sequence importance weights of stale samples (``sequence_importance_weights``).
    Stats (detached): ``clipfrac`` (share of sequences with tokens whose clipped term is strictly
    larger; per token for token_level), ``approx_kl`` (token mean of the k3 estimate, as PPO's),
    ``ratio_mean`` / ``ratio_max`` (of ``s_i`` over sequences with tokens) and ``loss``.
    """
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if clip_eps < 0 or clip_eps_high < 0:
        raise ValueError(f"clip ranges must be >= 0, got clip_eps={clip_eps}, clip_eps_high={clip_eps_high}")
    old_logp = old_logp.detach()
    advantages = advantages.detach().to(logp.dtype)
    valid = mask != 0
    rows = valid.any(dim=-1)
    log_ratio = torch.where(valid, logp - old_logp, torch.zeros_like(logp))
    seq_log_ratio = _row_mean(log_ratio, mask)  # [B]
    low, high = 1.0 - clip_eps, 1.0 + clip_eps_high
    if token_level:
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(-1)
        current = torch.where(valid, logp, torch.zeros_like(logp))
        ratio = torch.exp(seq_log_ratio.detach().unsqueeze(-1) + current - current.detach())
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, low, high)
        per_token = torch.maximum(unclipped, clipped)
        if weights is not None:
            w = weights.detach().to(per_token.dtype)
            per_token = per_token * (w.unsqueeze(-1) if w.dim() == 1 else w)
        cut = masked_mean((clipped > unclipped).to(logp.dtype), mask.to(logp.dtype))
    else:
        seq_adv = _row_mean(advantages, mask) if advantages.dim() == 2 else advantages
        ratio = torch.exp(seq_log_ratio)
        unclipped = -seq_adv * ratio
        clipped = -seq_adv * torch.clamp(ratio, low, high)
        per_sequence = torch.maximum(unclipped, clipped)
        if weights is not None:
            per_sequence = per_sequence * weights.detach().to(per_sequence.dtype)
        per_token = per_sequence.unsqueeze(-1).expand_as(logp)
        cut = masked_mean((clipped > unclipped).to(logp.dtype), rows.to(logp.dtype))
    loss = aggregate_loss(per_token, mask, agg, agg_constant)
    with torch.no_grad():
        s = torch.exp(seq_log_ratio.detach())
        rows_f = rows.to(logp.dtype)
        stats = {
            "loss": loss.detach(),
            "clipfrac": cut.detach(),
            "approx_kl": masked_mean(kl_estimate(old_logp, logp.detach(), "k3"), mask.to(logp.dtype)),
            "ratio_mean": masked_mean(s, rows_f),
            "ratio_max": torch.where(rows, s, torch.zeros_like(s)).max() if s.numel() else s.sum(),
        }
    return loss, stats


def sequence_importance_weights(
    prox_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor, cap: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per sequence ``min(exp(mean_t(log pi_prox - log pi_behaviour)), cap)`` ``[B]`` (0 for empty rows).

    GSPO's counterpart of ``truncated_importance_weights`` for stale samples: the correction from
    the behaviour policy to the proximal one is taken, like GSPO's own ratio, as the length-
    normalised (geometric-mean) sequence ratio, and truncated at ``cap``. It is not an unbiased
    importance weight (the full product of token ratios is, at a variance no step survives), but it
    is the one on GSPO's scale. Stats (over sequences with tokens): ``is_weight_mean``,
    ``is_weight_max`` (before truncation) and ``is_clipped_frac``.
    """
    if not cap > 0:
        raise ValueError(f"importance cap must be > 0, got {cap}")
    valid = mask != 0
    rows = valid.any(dim=-1)
    with torch.no_grad():
        log_w = torch.where(valid, prox_logp.detach() - behaviour_logp.to(prox_logp.dtype), torch.zeros_like(prox_logp))
        raw = torch.exp(_row_mean(log_w, mask))
        weights = torch.where(rows, raw.clamp(max=cap), torch.zeros_like(raw))
        rows_f = rows.to(raw.dtype)
        stats = {
            "is_weight_mean": masked_mean(weights, rows_f),
            "is_weight_max": torch.where(rows, raw, torch.zeros_like(raw)).max() if raw.numel() else raw.sum(),
            "is_clipped_frac": masked_mean((raw > cap).to(raw.dtype), rows_f),
        }
    return weights, stats


def truncated_importance_weights(
    prox_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor, cap: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token ``min(π_prox / π_behaviour, cap)`` (0 on padding) for samples drawn by stale weights.

    Decoupled PPO (Hilton et al. 2022) and TIS: the clipped ratio is taken against the proximal
    policy π_prox (the trainer's weights before this update), and the sampling correction from
    the behaviour policy (the engine that generated, maybe several versions ago) is a separate
    importance weight, truncated at ``cap`` so one unlikely token cannot dominate the step.
    Stats: ``is_weight_mean``, ``is_weight_max`` (before truncation) and ``is_clipped_frac``.
    """
    if not cap > 0:
        raise ValueError(f"importance cap must be > 0, got {cap}")
    valid = mask != 0
    with torch.no_grad():
        log_w = torch.where(valid, prox_logp.detach() - behaviour_logp.to(prox_logp.dtype), torch.zeros_like(prox_logp))
        raw = torch.exp(log_w)
        weights = torch.where(valid, raw.clamp(max=cap), torch.zeros_like(raw))
        mask_f = mask.to(raw.dtype)
        stats = {
            "is_weight_mean": masked_mean(weights, mask_f),
            "is_weight_max": torch.where(valid, raw, torch.zeros_like(raw)).max(),
            "is_clipped_frac": masked_mean((raw > cap).to(raw.dtype), mask_f),
        }
    return weights, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = 0.2,
    agg: str = "token-mean",
    agg_constant: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped critic loss ``0.5 * agg(max((V - R)^2, (V_clip - R)^2))``.

    ``V_clip = V_old + clip(V - V_old, -clip_eps, clip_eps)`` keeps the critic from moving far
    from the rollout-time values in one PPO epoch. ``clip_eps=None`` disables clipping.
    Stats: ``vf_clipfrac`` (share of tokens where the clipped error is strictly larger) and
    ``vf_loss``.
    """
    old_values = old_values.detach().to(values.dtype)
    returns = returns.detach().to(values.dtype)
    valid = mask != 0
    zero = torch.zeros_like(values)
    err = torch.where(valid, (values - returns) ** 2, zero)
    if clip_eps is None:
        per_token = err
        clipped_larger = torch.zeros_like(values, dtype=torch.bool)
    else:
        v_clip = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        err_clip = torch.where(valid, (v_clip - returns) ** 2, zero)
        per_token = torch.maximum(err, err_clip)
        clipped_larger = err_clip > err
    loss = 0.5 * aggregate_loss(per_token, mask, agg, agg_constant)
    stats = {
        "vf_loss": loss.detach(),
        "vf_clipfrac": masked_mean(clipped_larger.to(values.dtype), mask.to(values.dtype)).detach(),
    }
    return loss, stats


def dpo_loss(
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimisation (Rafailov et al. 2023) on sequence log-probs ``[B]``.

    Implicit rewards are ``beta * (log pi - log pi_ref)``; the loss is ``-log sigmoid(z)``
    with ``z = r_chosen - r_rejected``. ``label_smoothing = eps`` gives conservative DPO,
    ``(1 - eps) * -log sigmoid(z) + eps * -log sigmoid(-z)``, for preference labels assumed
    flipped with probability ``eps``. ``logsigmoid`` keeps large margins finite.
    Returns ``(mean loss, chosen_rewards, rejected_rewards)``; rewards are detached.
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    chosen = beta * (policy_chosen_logp - ref_chosen_logp.detach())
    rejected = beta * (policy_rejected_logp - ref_rejected_logp.detach())
    z = chosen - rejected
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses.mean(), chosen.detach(), rejected.detach()


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Reward-model pairwise loss ``mean(-log sigmoid(s_chosen - s_rejected))`` (Bradley-Terry)."""
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


def sequence_logprob(token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-probability of each whole response ``[B]``: the sum of its masked token log-probs."""
    return masked_sum(token_logp, mask, dim=-1)


def sft_nll_loss(
    token_logp: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token-mean",
    agg_constant: float | None = None,
) -> torch.Tensor:
    """Negative log-likelihood of the target tokens (token mean by default), for SFT and ptx."""
    return aggregate_loss(-token_logp, mask, agg, agg_constant)

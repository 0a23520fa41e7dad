"""Masked reductions shared by the advantage estimators and losses.

Every RLHF quantity lives on response tokens only, so statistics must ignore padding.
Masked entries are selected with ``torch.where`` rather than multiplied by the mask, so
``inf``/``nan`` garbage in padding positions (e.g. log-probs of pad tokens) cannot leak in.
A mask may hold non-binary weights; entries with weight 0 are ignored.
"""

from __future__ import annotations

import torch

__all__ = ["masked_sum", "masked_mean", "masked_var", "masked_whiten", "explained_variance"]

_WHITEN_EPS = 1e-8


def _zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x * mask`` on kept entries and exactly 0 elsewhere, even if ``x`` is non-finite there."""
    mask = mask.to(x.dtype)
    return torch.where(mask != 0, x * mask, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` weighted by ``mask``, over ``dim`` or over everything when ``dim`` is None."""
    weighted = _zero_padding(x, mask)
    return weighted.sum() if dim is None else weighted.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is non-zero.

    An all-zero mask yields 0 (not NaN), so an empty micro-batch cannot poison a step.
    """
    mask = mask.to(x.dtype)
    total = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(x, mask, dim) / total.clamp_min(torch.finfo(x.dtype).tiny)


def masked_var(
    x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, dim: int | None = None
) -> torch.Tensor:
    """Variance of ``x`` over masked entries; Bessel-corrected when ``unbiased``.

    With fewer than two kept entries the correction factor is capped at 1 (the result is then
    the biased variance, i.e. 0 for one entry) instead of dividing by zero.
    """
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask, dim)
    if dim is not None:
        mean = mean.unsqueeze(dim)
    var = masked_mean((x - mean) ** 2, mask, dim)
    if unbiased:
        n = mask.sum() if dim is None else mask.sum(dim=dim)
        var = var * n / (n - 1).clamp_min(1.0)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit (unbiased) variance over the masked entries.

    Used for batch-level advantage normalisation. With ``shift_mean=False`` the mean is added
    back, so only the scale changes (keeps the sign of advantages meaningful). Padding
    positions are set to 0 in the output.
    """
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + _WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask != 0, whitened, torch.zeros((), dtype=x.dtype, device=x.device))


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var[R - V] / Var[R]`` over masked entries: how much of the return the critic explains.

    1 is a perfect critic, 0 is no better than predicting the mean, negative is worse. If the
    returns have (near) zero variance the ratio is meaningless and 0 is returned.
    """
    values = values.float()
    returns = returns.float()
    var_returns = masked_var(returns, mask)
    var_residual = masked_var(returns - values, mask)
    defined = var_returns > 1e-8
    ratio = var_residual / torch.where(defined, var_returns, torch.ones_like(var_returns))
    return torch.where(defined, 1.0 - ratio, torch.zeros_like(ratio))

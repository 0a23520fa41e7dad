"""Per-token KL estimators and KL-penalty coefficient controllers.

The estimators follow J. Schulman, "Approximating KL Divergence" (2020). With samples drawn
from the policy and ``d = logp - ref_logp``:

* ``k1 = d``                      unbiased, high variance, can be negative;
* ``k2 = d**2 / 2``               biased, low variance, never negative;
* ``k3 = exp(-d) - 1 + d``        unbiased, low variance, never negative.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "KL_ESTIMATORS",
    "KL_CONTROLLERS",
    "kl_estimate",
    "FixedKLController",
    "AdaptiveKLController",
    "make_kl_controller",
]

KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
KL_CONTROLLERS: tuple[str, ...] = ("fixed", "adaptive")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Elementwise estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi.

    ``k3`` is evaluated as ``expm1(-d) + d`` in float64 and clamped at 0: the naive float32
    form loses all precision for small ``d`` (catastrophic cancellation) and can go slightly
    negative. The result is finite for ``|d| <= 30`` in float32/bfloat16 (``exp(30) ~ 1e13``)
    and returned in the input dtype. Gradients flow through all estimators.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid estimators are {list(KL_ESTIMATORS)}")
    d = logp - ref_logp
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    d64 = d.to(torch.float64)
    return (torch.expm1(-d64) + d64).clamp_min(0.0).to(d.dtype)


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


class FixedKLController:
    """Constant KL coefficient; ``update`` is a no-op so both controllers share one interface."""

    kind = "fixed"

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef!r}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt; accepted for interface compatibility."""

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"FixedKLController(value={self.value:.6g})"


class AdaptiveKLController:
    """Proportional controller steering the observed KL towards ``target`` (Ziegler et al. 2019).

    After each batch: ``e = clip(current_kl / target - 1, -0.2, 0.2)`` and
    ``value *= 1 + e * n_steps / horizon``. The clip bounds how fast the coefficient can move,
    so one noisy KL reading cannot blow up or zero the penalty.
    """

    kind = "adaptive"
    max_proportional_error = 0.2

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef!r}")
        _check_positive("target", target)
        _check_positive("horizon", horizon)
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Scale the coefficient up when KL exceeds the target and down when it is below."""
        err = float(current_kl) / self.target - 1.0
        err = min(max(err, -self.max_proportional_error), self.max_proportional_error)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))

    def __repr__(self) -> str:
        return (
            f"AdaptiveKLController(value={self.value:.6g}, target={self.target:.6g}, "
            f"horizon={self.horizon:.6g})"
        )


def _check_kind(state: dict[str, Any], kind: str) -> None:
    found = state.get("kind", kind)
    if found != kind:
        raise ValueError(f"cannot load a {found!r} KL controller state into a {kind!r} controller")


def make_kl_controller(
    kind: str, kl_coef: float, target: float | None = None, horizon: float | None = None
) -> FixedKLController | AdaptiveKLController:
    """Build a KL controller from config values; ``adaptive`` needs ``target`` and ``horizon``."""
    if kind == "fixed":
        return FixedKLController(kl_coef)
    if kind == "adaptive":
        if target is None or horizon is None:
            raise ValueError("adaptive KL controller needs both 'target' and 'horizon'")
        return AdaptiveKLController(kl_coef, target, horizon)
    raise ValueError(f"unknown KL controller {kind!r}; valid kinds are {list(KL_CONTROLLERS)}")

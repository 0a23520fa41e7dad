"""The advantage step of each online algorithm, against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from rayrlhf.config import AlgorithmConfig
from rayrlhf.orchestrator.experience import compute_advantages, fill_invalid_with_group_mean

MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])


def run(name: str, scores: list[float], valid: list[bool] | None = None, kl_coef: float = 0.0, **kw):
    cfg = AlgorithmConfig(name=name, group_size=2 if name in ("grpo", "rloo") else 1, **kw)
    return compute_advantages(
        cfg,
        scores=torch.tensor(scores),
        valid=torch.tensor(valid or [True] * 4),
        truncated=torch.tensor([False, False, False, True]),
        mask=MASK,
        logp=torch.full((4, 3), -1.0),
        ref_logp=torch.full((4, 3), -1.5),
        values=torch.zeros(4, 3) if name == "ppo" else None,
        kl_coef=kl_coef,
    )


def test_grpo_is_group_normalised_and_broadcast_over_response_tokens() -> None:
    out = run("grpo", [1.0, 0.0, 2.0, 2.0])
    # group 1: mean 0.5, std sqrt(0.5) -> ±0.7071; group 2 equal scores -> 0
    expected = torch.tensor([[0.7071, 0.7071, 0.0], [-0.7071, -0.7071, -0.7071], [0.0, 0, 0], [0.0, 0, 0]])
    torch.testing.assert_close(out.advantages, expected, atol=1e-3, rtol=0)
    # GRPO keeps the KL out of the reward by default (it goes into the loss).
    assert out.rewards.sum().item() == pytest.approx(5.0)


def test_rloo_with_kl_in_reward_subtracts_the_kl_sum() -> None:
    out = run("rloo", [1.0, 0.0, 2.0, 2.0], kl_coef=0.1, kl_estimator="k1")
    # k1 = 0.5 per token; sequence rewards: 1 - 0.1, 0 - 0.15, 2 - 0.05, 2 - 0.1
    r = torch.tensor([0.9, -0.15, 1.95, 1.9])
    expected_seq = torch.tensor([r[0] - r[1], r[1] - r[0], r[2] - r[3], r[3] - r[2]])
    torch.testing.assert_close(out.advantages[:, 0], expected_seq, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.kl, 0.5 * MASK)


def test_ppo_gae_with_zero_values_is_reward_to_go_before_whitening() -> None:
    out = run("ppo", [1.0, 2.0, 3.0, 4.0], kl_coef=0.1, kl_estimator="k1", lam=1.0, whiten_advantages=False)
    # token rewards: -0.1 * 0.5 per token, plus the score on the last token; summed from the end
    expected = torch.tensor([[0.9, 0.95, 0.0], [1.85, 1.9, 1.95], [2.95, 0.0, 0.0], [3.9, 3.95, 0.0]])
    torch.testing.assert_close(out.advantages, expected * MASK, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.returns, out.advantages)


def test_overlong_penalty_and_invalid_samples() -> None:
    out = run("reinforce_pp", [1.0, 1.0, 1.0, 1.0], valid=[True, False, True, True], overlong_penalty=0.5)
    assert out.scores.tolist() == [1.0, 0.0, 1.0, 0.5]
    assert (out.advantages[1] == 0).all()  # unscorable: out of the update


def test_invalid_group_members_take_the_group_mean() -> None:
    filled = fill_invalid_with_group_mean(torch.tensor([1.0, float("nan"), 3.0, 5.0]), torch.tensor([True, False, True, True]), 2)
    assert filled.tolist() == [1.0, 1.0, 3.0, 5.0]
    out = run("grpo", [1.0, 9.0, 0.0, 1.0], valid=[True, False, True, True])
    assert (out.advantages[:2] == 0).all()

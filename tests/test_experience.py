"""The advantage step of each online algorithm, against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from rayrlhf.config import AlgorithmConfig
from rayrlhf.orchestrator.experience import compute_advantages, fill_invalid_with_group_mean

MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])


def run(name: str, scores: list[float], valid: list[bool] | None = None, kl_coef: float = 0.0,
        response_len: list[float] | None = None, max_new_tokens: int | None = None, **kw):
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
        response_len=None if response_len is None else torch.tensor(response_len),
        max_new_tokens=max_new_tokens,
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


def test_scores_are_clipped_then_normalised_and_unscored_samples_stay_out() -> None:
    from rayrlhf.orchestrator.experience import RunningMoments, shape_scores

    scores = torch.tensor([5.0, -7.0, 1.0, float("nan")])
    valid = torch.tensor([True, True, True, False])
    clipped = shape_scores(scores, valid, clip=2.0, normalize="none")
    assert clipped[:3].tolist() == [2.0, -2.0, 1.0] and clipped[3].isnan()
    batch = shape_scores(scores, valid, clip=None, normalize="batch")
    assert batch[:3].mean().abs() < 1e-6 and (batch[:3].std() - 1).abs() < 1e-5 and batch[3].isnan()

    moments = RunningMoments()
    first = shape_scores(torch.tensor([1.0, 3.0]), torch.tensor([True, True]), None, "running", moments)
    second = shape_scores(torch.tensor([5.0, 7.0]), torch.tensor([True, True]), None, "running", moments)
    everything = torch.tensor([1.0, 3.0, 5.0, 7.0])
    assert moments.count == 4 and moments.mean == pytest.approx(4.0) and moments.std == pytest.approx(float(everything.std()))
    torch.testing.assert_close(second, (torch.tensor([5.0, 7.0]) - 4.0) / everything.std(), atol=1e-5, rtol=0)
    assert first.tolist() == pytest.approx([-0.7071, 0.7071], abs=1e-3)  # normalised by the first step alone
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert restored.state_dict() == moments.state_dict()


def test_the_kl_controller_reads_only_scored_samples() -> None:
    from rayrlhf.orchestrator.experience import controller_kl

    kl = torch.tensor([[0.5, 0.5], [0.0, 0.0]])  # the second sample was unscored: its KL was zeroed
    mask = torch.ones(2, 2)
    assert controller_kl(kl, mask, torch.tensor([True, False])) == (1.0, 1)  # not 0.5 (the mean with a fake 0)


def test_logprob_mismatch_is_zero_for_the_same_model_and_grows_with_a_gap() -> None:
    from rayrlhf.orchestrator.experience import logprob_mismatch

    logp = torch.tensor([[-1.0, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert logprob_mismatch(logp, logp, mask) == {"rollout/logprob_mismatch": 0.0, "rollout/logprob_max_diff": 0.0}
    off = logprob_mismatch(logp + torch.tensor([[0.1, 0.0, 5.0]]), logp, mask)  # padding differences do not count
    assert off["rollout/logprob_max_diff"] == pytest.approx(0.1) and 0 < off["rollout/logprob_mismatch"] < 0.01


def test_overlong_filter_drops_truncated_samples_from_the_loss_but_not_from_the_baseline() -> None:
    """Sample 3 is truncated: filtered, it trains on nothing, and its sibling keeps the advantage it has
    without the filter (the group's mean and std still include the truncated score, as in DAPO)."""
    plain = run("grpo", [1.0, 0.0, 2.0, 0.0])
    filtered = run("grpo", [1.0, 0.0, 2.0, 0.0], overlong_filter=True)
    torch.testing.assert_close(filtered.advantages[:3], plain.advantages[:3])
    assert plain.advantages[3, 0].item() == pytest.approx(-0.7071, abs=1e-3) and (filtered.advantages[3] == 0).all()
    torch.testing.assert_close(filtered.loss_mask, MASK * torch.tensor([1.0, 1.0, 1.0, 0.0]).unsqueeze(1))
    torch.testing.assert_close(plain.loss_mask, MASK)
    unscored = run("grpo", [1.0, 0.0, 2.0, 0.0], valid=[True, False, True, True], overlong_filter=True)
    assert (unscored.loss_mask[1] == 0).all() and (unscored.loss_mask[3] == 0).all()


def test_overlong_filter_whitens_ppo_advantages_over_the_tokens_that_train() -> None:
    out = run("ppo", [1.0, 2.0, 3.0, 4.0], overlong_filter=True)
    assert (out.advantages[3] == 0).all()
    kept = out.loss_mask != 0
    assert out.advantages[kept].mean().abs() < 1e-5 and (out.advantages[kept].std() - 1).abs() < 1e-4


def test_soft_overlong_penalty_lowers_the_scores_of_long_responses() -> None:
    """max_new_tokens 3, buffer 2, factor 1: free up to 1 token, -0.5 at 2 tokens, -1 at 3 (lengths from the mask: 2, 3, 1, 2)."""
    out = run("reinforce_pp", [1.0, 1.0, 1.0, 1.0], overlong_buffer=2, max_new_tokens=3)
    assert out.scores.tolist() == pytest.approx([0.5, 0.0, 1.0, 0.5])
    assert out.overlong_penalty.tolist() == pytest.approx([-0.5, -1.0, 0.0, -0.5])
    both = run("reinforce_pp", [1.0, 1.0, 1.0, 1.0], valid=[True, True, False, True], overlong_buffer=2,
               overlong_penalty_factor=0.5, overlong_penalty=0.25, response_len=[3, 3, 3, 1], max_new_tokens=3)
    assert both.scores.tolist() == pytest.approx([0.5, 0.5, 0.0, 0.75])  # the hard penalty adds for truncated sample 3
    assert both.overlong_penalty.tolist() == pytest.approx([-0.5, -0.5, 0.0, 0.0])  # an unscored sample pays nothing
    assert run("reinforce_pp", [1.0] * 4).overlong_penalty.tolist() == [0.0] * 4  # disabled by default
    with pytest.raises(ValueError, match="max_new_tokens"):
        run("reinforce_pp", [1.0] * 4, overlong_buffer=2)

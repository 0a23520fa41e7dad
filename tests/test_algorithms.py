"""Tests for the pure-torch RLHF math in ``rayrlhf.algorithms``: utilities, KL, advantages, overlong and pass@k
(CPU only, no Ray). The losses are in tests/test_losses.py."""

from __future__ import annotations

import math

import pytest
import torch
from by_hand import lengths_to_mask, t

import rayrlhf.algorithms as alg
from rayrlhf.algorithms import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    gae,
    group_advantages,
    kl_estimate,
    make_kl_controller,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    pass_at_k,
    reinforce_pp_advantages,
    reinforce_pp_returns,
    rloo_advantages,
    sample_metrics,
    soft_overlong_penalty,
    token_rewards,
)

# ----------------------------------------------------------------------------- exports / utils


def test_all_public_names_importable():
    assert len(alg.__all__) == len(set(alg.__all__))
    for name in alg.__all__:
        assert getattr(alg, name) is not None, name
    assert KL_ESTIMATORS == ("k1", "k2", "k3")


def test_masked_reductions_by_hand_ignore_nonfinite_padding():
    x = t([[1.0, 2.0, 3.0], [4.0, float("nan"), float("inf")]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    assert masked_sum(x, mask).item() == pytest.approx(7.0)
    assert masked_mean(x, mask).item() == pytest.approx(7.0 / 3.0)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), t([1.5, 4.0]))
    torch.testing.assert_close(masked_sum(x, mask, dim=1), t([3.0, 4.0]))
    # values 1, 2, 4: squared deviations sum to 42/9
    assert masked_var(x, mask).item() == pytest.approx(42 / 9 / 2)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(42 / 9 / 3)
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0
    assert masked_var(t([[5.0, 1.0]]), t([[1, 0]])).item() == 0.0


def test_masked_whiten_statistics_and_padding():
    torch.manual_seed(0)
    x = torch.randn(4, 9) * 3.0 + 2.0
    mask = lengths_to_mask([1, 9, 4, 6], 9)
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-4)
    assert torch.all(w[mask == 0] == 0)
    w2 = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(w2, mask).item() == pytest.approx(masked_mean(x, mask).item(), abs=1e-5)
    assert masked_var(w2, mask).item() == pytest.approx(1.0, abs=1e-4)
    assert torch.all(w2[mask == 0] == 0)


def test_explained_variance():
    returns = t([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    mean_pred = torch.full_like(returns, 2.5)
    assert explained_variance(mean_pred, returns, mask).item() == pytest.approx(0.0, abs=1e-6)
    # residual R - V = [1, 1, 1, -2] -> unbiased var 6.75/3 = 2.25; var R = 5/3
    values = returns - t([[1.0, 1.0, 1.0], [-2.0, 0.0, 0.0]])
    assert explained_variance(values, returns, mask).item() == pytest.approx(1 - 2.25 / (5 / 3))
    assert explained_variance(mean_pred, torch.ones_like(returns), mask).item() == 0.0


# ----------------------------------------------------------------------------- KL


def test_kl_k1_k2_k3_by_hand():
    logp, ref = t([0.5, -1.0, 0.0]), t([0.0, 0.0, 0.0])
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), t([0.5, -1.0, 0.0]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), t([0.125, 0.5, 0.0]))
    expected = t([math.exp(-0.5) - 0.5, math.e - 2.0, 0.0])
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), expected)
    assert kl_estimate(logp, ref, "k3")[2].item() == 0.0


def test_kl_k3_large_and_tiny_differences():
    d = torch.cat([torch.linspace(-30, 30, 601), t([-1e-4, 1e-4, 1e-7, -1e-7, 0.0])])
    k3 = kl_estimate(d, torch.zeros_like(d), "k3")
    assert k3.dtype == torch.float32
    assert torch.isfinite(k3).all()
    assert (k3 >= 0).all()
    ref = torch.tensor([math.expm1(-v) + v for v in d.double().tolist()], dtype=torch.float64)
    torch.testing.assert_close(k3.double(), ref, rtol=1e-6, atol=0.0)
    # tiny d: k3 ~ d^2/2, where the naive float32 formula collapses to 0 or goes negative
    assert k3[-5].item() == pytest.approx(5e-9, rel=1e-3)
    bf = kl_estimate(d.bfloat16(), torch.zeros_like(d).bfloat16(), "k3")
    assert bf.dtype == torch.bfloat16 and torch.isfinite(bf).all() and (bf >= 0).all()


def test_kl_k3_gradient_flows():
    logp = t([0.3, -2.0]).requires_grad_()
    kl_estimate(logp, torch.zeros(2), "k3").sum().backward()
    torch.testing.assert_close(logp.grad, 1 - torch.exp(-logp.detach()))


def test_kl_unknown_estimator_raises():
    with pytest.raises(ValueError, match=r"'k4'.*k1.*k2.*k3"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k4")


def test_adaptive_kl_controller_moves_and_clips():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=6.6, n_steps=256)  # +10% error
    assert ctl.value == pytest.approx(0.1 * (1 + 0.1 * 256 / 10000))
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=60.0, n_steps=256)  # error clipped to +20%
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=0.0, n_steps=256)  # error clipped to -20%
    assert ctl.value == pytest.approx(0.1 * (1 - 0.2 * 256 / 10000))
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(current_kl=6.0, n_steps=50)
    assert ctl.value == pytest.approx(0.1)


def test_kl_controllers_state_dict_round_trip_and_factory():
    ctl = make_kl_controller("adaptive", 0.05, target=3.0, horizon=500)
    assert isinstance(ctl, AdaptiveKLController)
    for kl in (10.0, 1.0, 4.0):
        ctl.update(kl, 64)
    fresh = make_kl_controller("adaptive", 0.05, target=3.0, horizon=500)
    fresh.load_state_dict(ctl.state_dict())
    assert fresh.value == ctl.value and fresh.state_dict() == ctl.state_dict()

    fixed = make_kl_controller("fixed", 0.02)
    assert isinstance(fixed, FixedKLController)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.02
    other = FixedKLController(0.5)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.02
    with pytest.raises(ValueError, match="adaptive"):
        other.load_state_dict(ctl.state_dict())
    with pytest.raises(ValueError, match="target"):
        make_kl_controller("adaptive", 0.05)
    with pytest.raises(ValueError, match=r"'pid'.*fixed.*adaptive"):
        make_kl_controller("pid", 0.05)


# ----------------------------------------------------------------------------- advantages


def test_token_rewards_places_score_on_last_token():
    scores = t([1.0, 2.0, 3.0])
    kl = torch.full((3, 3), 0.5)
    kl[1, 1:] = float("nan")  # garbage on padding must not leak
    mask = t([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    expected = t([[-0.05, -0.05, 0.95], [1.95, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(token_rewards(scores, kl, mask, kl_coef=0.1), expected)


def gae_loop_reference(rewards, values, lengths, gamma, lam):
    adv = torch.zeros_like(rewards)
    for b, length in enumerate(lengths):
        running = 0.0
        for i in reversed(range(length)):
            next_v = values[b, i + 1].item() if i + 1 < length else 0.0
            delta = rewards[b, i].item() + gamma * next_v - values[b, i].item()
            running = delta + gamma * lam * running
            adv[b, i] = running
    mask = lengths_to_mask(lengths, rewards.shape[1]).to(rewards.dtype)
    return adv, (adv + values) * mask


def test_gae_by_hand_gamma_lam_one():
    rewards, values = t([[1.0, 2.0, 3.0]]), t([[0.5, 1.0, 1.5]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, t([[6.0, 5.0, 3.0]]))  # reward-to-go
    torch.testing.assert_close(adv, t([[5.5, 4.0, 1.5]]))  # reward-to-go minus V


def test_gae_length_one_response():
    rewards = t([[2.0, 7.0, 7.0]])
    values = t([[0.5, 9.0, 9.0]])
    adv, ret = gae(rewards, values, t([[1, 0, 0]]), gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv, t([[1.5, 0.0, 0.0]]))
    torch.testing.assert_close(ret, t([[2.0, 0.0, 0.0]]))


def test_gae_matches_loop_reference_on_ragged_rows():
    torch.manual_seed(1)
    lengths, num_tokens = [1, 5, 3, 7, 2], 7
    rewards = torch.randn(5, num_tokens, dtype=torch.float64)
    values = torch.randn(5, num_tokens, dtype=torch.float64, requires_grad=True)
    mask = lengths_to_mask(lengths, num_tokens).double()
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    ref_adv, ref_ret = gae_loop_reference(rewards, values.detach(), lengths, 0.9, 0.8)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    assert not adv.requires_grad and not ret.requires_grad
    assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)


def test_group_advantages_by_hand():
    scores = t([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.1, 0.1, 0.1])
    adv = group_advantages(scores, group_size=3)
    eps = 1e-6
    expected = t([-1 / (1 + eps), 0.0, 1 / (1 + eps), 0, 0, 0, 0, 0, 0])
    torch.testing.assert_close(adv, expected)
    assert torch.all(adv[3:] == 0)  # equal-score groups give exact zeros
    dr = group_advantages(scores, group_size=3, scale_by_std=False)
    torch.testing.assert_close(dr, t([-1.0, 0.0, 1.0, 0, 0, 0, 0, 0, 0]))
    assert torch.all(dr[3:] == 0)
    # unbiased std of [0, 4] is 2*sqrt(2)
    torch.testing.assert_close(group_advantages(t([0.0, 4.0]), 2, eps=0.0), t([-1.0, 1.0]) / math.sqrt(2))
    torch.testing.assert_close(group_advantages(t([3.0, 4.0]), 1, scale_by_std=False), t([0.0, 0.0]))


def test_group_advantages_invalid_inputs():
    with pytest.raises(ValueError, match=r"5.*divisible.*3"):
        group_advantages(torch.zeros(5), group_size=3)
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.zeros(4), group_size=1)
    with pytest.raises(ValueError, match=r"\[B\]"):
        group_advantages(torch.zeros(2, 2), group_size=2)


def test_rloo_by_hand():
    scores = t([1.0, 2.0, 3.0, 6.0, 0.3, 0.3])
    adv = rloo_advantages(scores[:4], group_size=4)
    torch.testing.assert_close(adv, t([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0]))
    adv2 = rloo_advantages(scores, group_size=2)
    torch.testing.assert_close(adv2, t([-1.0, 1.0, -3.0, 3.0, 0.0, 0.0]))
    assert torch.all(adv2[4:] == 0)
    with pytest.raises(ValueError, match="divisible"):
        rloo_advantages(scores, group_size=4)
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(scores, group_size=1)


def test_reinforce_pp_returns_match_loop_and_advantages_are_whitened():
    torch.manual_seed(2)
    lengths, num_tokens, gamma = [3, 1, 6, 4], 6, 0.9
    rewards = torch.randn(4, num_tokens, dtype=torch.float64)
    mask = lengths_to_mask(lengths, num_tokens).double()
    ref = torch.zeros_like(rewards)
    for b, length in enumerate(lengths):
        running = 0.0
        for i in reversed(range(length)):
            running = rewards[b, i].item() + gamma * running
            ref[b, i] = running
    ret = reinforce_pp_returns(rewards, mask, gamma)
    torch.testing.assert_close(ret, ref)
    torch.testing.assert_close(
        reinforce_pp_returns(t([[1.0, 2.0, 3.0]]), torch.ones(1, 3)), t([[6.0, 5.0, 3.0]])
    )
    adv = reinforce_pp_advantages(rewards, mask, gamma)
    torch.testing.assert_close(adv, masked_whiten(ref, mask))
    assert masked_mean(adv, mask).item() == pytest.approx(0.0, abs=1e-9)
    assert masked_var(adv, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(adv[mask == 0] == 0)


# ----------------------------------------------------------------------------- overlong, pass@k


def test_soft_overlong_penalty_by_hand():
    """L_max 10, L_cache 4, factor 0.5: free up to 6 tokens, then -0.125 per token down to -0.5 at 10 and after."""
    lengths = t([3, 6, 7, 8, 10, 12])
    torch.testing.assert_close(soft_overlong_penalty(lengths, 10, 4, 0.5), t([0.0, 0.0, -0.125, -0.25, -0.5, -0.5]))
    torch.testing.assert_close(soft_overlong_penalty(lengths, 10, 0, 0.5), torch.zeros(6))
    with pytest.raises(ValueError, match="cannot exceed"):
        soft_overlong_penalty(lengths, 10, 11)


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 4, 2) == 1.0
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    with pytest.raises(ValueError, match="pass@6"):
        pass_at_k(5, 1, 6)


def test_sample_metrics_mean_and_pass_at_k_with_unscored_samples():
    scores = [[1.0, 0.0, None, 1.0], [0.0, 0.0, 0.0, 0.0], [None, None, None, None]]
    out = sample_metrics(scores, ks=[1, 2], threshold=1.0)
    assert out["pass@1"] == pytest.approx(0.5 / 3)  # prompt 0: 2 of 4 correct (None is not correct)
    assert out["pass@2"] == pytest.approx((1 - 1 / 6) / 3)
    assert out["mean@4"] == pytest.approx((2 / 3 + 0.0) / 2)  # prompt 2 has no scored sample
    assert out["prompts"] == 3.0
    assert sample_metrics([[0.6, 0.4]], ks=[1], threshold=0.5)["pass@1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least 3 samples"):
        sample_metrics([[1.0, 0.0]], ks=[3], threshold=1.0)


def test_gae_and_reward_to_go_skip_environment_tokens_inside_a_row() -> None:
    """A multi-turn row: policy tokens, then an environment's reply (mask 0), then policy tokens again. GAE and
    REINFORCE++'s reward-to-go must equal those of the policy tokens alone, laid end to end: the environment's
    tokens neither earn nor discount (before, a masked token ended the episode there)."""
    from rayrlhf.algorithms import gae, reinforce_pp_returns

    rewards = torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 9.0, 9.0, 0.1, 0.3, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]])  # two turns; the last column is padding
    keep = mask[0] != 0
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    adv_c, ret_c = gae(rewards[:, keep], values[:, keep], mask[:, keep], gamma=0.9, lam=0.8)
    assert torch.allclose(adv[:, keep], adv_c) and torch.allclose(ret[:, keep], ret_c)
    assert torch.all(adv[:, ~keep] == 0) and torch.all(ret[:, ~keep] == 0)
    # by hand, compacted: r = [0, .5, 0, 1], V = [.2, .4, .1, .3], gamma .9, lambda .8
    d = [0 + 0.9 * 0.4 - 0.2, 0.5 + 0.9 * 0.1 - 0.4, 0 + 0.9 * 0.3 - 0.1, 1.0 - 0.3]
    a3 = d[3]
    a2 = d[2] + 0.72 * a3
    a1 = d[1] + 0.72 * a2
    a0 = d[0] + 0.72 * a1
    assert torch.allclose(adv_c, torch.tensor([[a0, a1, a2, a3]]))
    g = reinforce_pp_returns(rewards, mask, gamma=0.9)
    assert torch.allclose(g[:, keep], reinforce_pp_returns(rewards[:, keep], mask[:, keep], gamma=0.9))
    assert torch.allclose(g[0, keep], torch.tensor([0.9 * (0.5 + 0.9 * 0.9 * 1.0), 0.5 + 0.81, 0.9, 1.0]))

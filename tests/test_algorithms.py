"""Tests for the pure-torch RLHF math in ``rayrlhf.algorithms`` (CPU only, no Ray)."""

from __future__ import annotations

import math

import pytest
import torch

import rayrlhf.algorithms as alg
from rayrlhf.algorithms import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    aggregate_loss,
    bradley_terry_loss,
    dpo_loss,
    explained_variance,
    gae,
    group_advantages,
    gspo_policy_loss,
    kl_estimate,
    make_kl_controller,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    pass_at_k,
    ppo_policy_loss,
    reinforce_pp_advantages,
    reinforce_pp_returns,
    rloo_advantages,
    sample_metrics,
    sequence_importance_weights,
    sequence_logprob,
    sft_nll_loss,
    soft_overlong_penalty,
    token_rewards,
    truncated_importance_weights,
    value_loss,
)


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def lengths_to_mask(lengths: list[int], num_tokens: int) -> torch.Tensor:
    return (torch.arange(num_tokens)[None, :] < torch.tensor(lengths)[:, None]).float()


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


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


# ----------------------------------------------------------------------------- PPO losses

# ratios / advantages chosen so each clip case appears once:
#   A>0 r>1+e (clip), A<0 r<1-e (clip), A>0 in range, A<0 r<1-e (clip), A>0 r<1-e, A<0 r>1+e
RATIOS = [1.5, 0.5, 1.1, 0.7, 0.5, 1.5]
ADVS = [1.0, -1.0, 1.0, -1.0, 1.0, -1.0]


def ppo_case():
    # row 0 holds the six cases, row 1 is a length-1 response; padding holds garbage log-probs
    logp = torch.full((2, 6), 50.0)
    logp[0] = torch.log(t(RATIOS))
    logp[1, 0] = math.log(1.1)
    old = torch.zeros(2, 6)
    old[1, 1:] = -50.0
    adv = torch.zeros(2, 6)
    adv[0], adv[1, 0] = t(ADVS), 2.0
    mask = torch.zeros(2, 6)
    mask[0], mask[1, 0] = 1.0, 1.0
    return logp.requires_grad_(), old, adv, mask


def test_ppo_policy_loss_by_hand_clipfrac_and_zero_grad_when_clipped():
    logp, old, adv, mask = ppo_case()
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    per_token = [-1.2, 0.8, -1.1, 0.8, -0.5, 1.5, -2.2]
    assert loss.item() == pytest.approx(sum(per_token) / 7, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(3 / 7)
    ratios = RATIOS + [1.1]
    assert stats["ratio_mean"].item() == pytest.approx(sum(ratios) / 7, abs=1e-6)
    assert stats["approx_kl"].item() == pytest.approx(sum(r - 1 - math.log(r) for r in ratios) / 7, abs=1e-6)
    assert all(not v.requires_grad for v in stats.values())
    loss.backward()
    grad = logp.grad
    assert torch.isfinite(grad).all()
    # d(-A r)/dlogp = -A r where unclipped; exactly 0 where the clip is active
    expected = torch.zeros(2, 6)
    expected[0] = t([0.0, 0.0, -1.1, 0.0, -0.5, 1.5]) / 7
    expected[1, 0] = -2.2 / 7
    torch.testing.assert_close(grad, expected)
    assert grad[0, 0] == 0 and grad[0, 1] == 0 and grad[0, 3] == 0


def test_ppo_asymmetric_clip_changes_which_tokens_clip():
    logp, old, adv, mask = ppo_case()
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.6)
    # token 0 (A>0, r=1.5) is inside [0.8, 1.6] now; the lower-side clips stay
    per_token = [-1.5, 0.8, -1.1, 0.8, -0.5, 1.5, -2.2]
    assert loss.item() == pytest.approx(sum(per_token) / 7, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(2 / 7)
    loss.backward()
    assert logp.grad[0, 0].item() == pytest.approx(-1.5 / 7)
    _, stats_low = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.6, clip_eps_high=0.2)
    assert stats_low["clipfrac"].item() == pytest.approx(1 / 7)  # only token 0 clips


def test_truncated_importance_weights_by_hand_and_in_the_ppo_loss():
    """Decoupled PPO / TIS: w = min(π_prox / π_behaviour, cap) per token, 0 on padding, a constant in the gradient."""
    prox = t([[math.log(0.5), math.log(0.2), math.log(0.9)], [math.log(0.3), 0.0, 0.0]])
    behaviour = t([[math.log(0.25), math.log(0.4), math.log(0.1)], [math.log(0.3), 5.0, 5.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    weights, stats = truncated_importance_weights(prox, behaviour, mask, cap=2.0)
    torch.testing.assert_close(weights, t([[2.0, 0.5, 2.0], [1.0, 0.0, 0.0]]))  # 2.0 exact, 0.5, 9 -> 2, 1
    assert stats["is_weight_mean"].item() == pytest.approx((2.0 + 0.5 + 2.0 + 1.0) / 4)
    assert stats["is_weight_max"].item() == pytest.approx(9.0, rel=1e-5)  # before truncation
    assert stats["is_clipped_frac"].item() == pytest.approx(1 / 4)  # 2.0 itself is not over the cap
    with pytest.raises(ValueError, match="cap"):
        truncated_importance_weights(prox, behaviour, mask, cap=0.0)

    # In the loss: each token's term scaled by its weight; on-policy ratios (logp == old) leave -A * w.
    logp = prox.clone().requires_grad_(True)
    adv = t([[1.0, -1.0, 2.0], [0.5, 0.0, 0.0]])
    loss, _ = ppo_policy_loss(logp, prox, adv, mask, weights=weights)
    assert loss.item() == pytest.approx(-(2.0 * 1.0 + 0.5 * -1.0 + 2.0 * 2.0 + 1.0 * 0.5) / 4, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, -(adv * weights) / 4)


def test_ppo_sequence_level_advantages_broadcast():
    torch.manual_seed(3)
    logp, old = torch.randn(3, 4) * 0.3, torch.randn(3, 4) * 0.3
    mask = lengths_to_mask([4, 1, 2], 4)
    seq_adv = t([1.0, -2.0, 0.5])
    loss_seq, _ = ppo_policy_loss(logp, old, seq_adv, mask)
    loss_tok, _ = ppo_policy_loss(logp, old, seq_adv[:, None].expand(3, 4), mask)
    torch.testing.assert_close(loss_seq, loss_tok)


def test_aggregation_modes_by_hand():
    per_token = t([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0], [7.0, 7.0, 7.0]])
    mask = t([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert aggregate_loss(per_token, mask, "token-mean").item() == pytest.approx(2.5)
    assert aggregate_loss(per_token, mask, "seq-mean-token-mean").item() == pytest.approx(3.0)
    assert aggregate_loss(per_token, mask, "seq-mean-token-sum-norm").item() == pytest.approx((2 + 4 / 3) / 3)
    got = aggregate_loss(per_token, mask, "seq-mean-token-sum-norm", agg_constant=2)
    assert got.item() == pytest.approx((3 + 2) / 3)
    with pytest.raises(ValueError, match=r"'sum'.*token-mean"):
        aggregate_loss(per_token, mask, "sum")
    # the policy loss uses the same reduction: ratio 1 makes per-token loss exactly -A
    zeros = torch.zeros(3, 3)
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        loss, _ = ppo_policy_loss(zeros, zeros, -per_token, mask, agg=agg)
        assert loss.item() == pytest.approx(aggregate_loss(per_token, mask, agg).item())


def test_value_loss_clipping_by_hand():
    values = t([[1.0, 2.0, 0.0, 1.1, 3.0, 9.0]])
    old = t([[0.5, 2.5, 0.0, 1.0, 1.0, 0.0]])
    returns = t([[2.0, 1.0, 0.5, 2.0, 2.0, 0.0]])
    mask = t([[1, 1, 1, 1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.69 + 0.25 + 0.81 + 1.0) / 5)
    assert stats["vf_clipfrac"].item() == pytest.approx(2 / 5)
    unclipped, stats_nc = value_loss(values, old, returns, mask, clip_eps=None)
    assert unclipped.item() == pytest.approx(0.5 * (1 + 1 + 0.25 + 0.81 + 1) / 5)
    assert stats_nc["vf_clipfrac"].item() == 0.0
    v = values.clone().requires_grad_()
    value_loss(v, old, returns, mask)[0].backward()
    # tokens 0 and 1 use the clipped branch (constant in V) -> zero gradient
    assert v.grad[0, 0] == 0 and v.grad[0, 1] == 0 and v.grad[0, 5] == 0
    assert v.grad[0, 4].item() == pytest.approx((3.0 - 2.0) / 5)


# ----------------------------------------------------------------------------- preference / SFT


def test_dpo_loss_by_hand_with_label_smoothing():
    pc, pr, rc, rr = t([-1.0, -5.0]), t([-3.0, -4.0]), t([-2.0, -5.0]), t([-2.0, -4.0])
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)
    torch.testing.assert_close(chosen, t([0.1, 0.0]))
    torch.testing.assert_close(rejected, t([-0.1, 0.0]))
    assert loss.item() == pytest.approx((softplus(-0.2) + math.log(2)) / 2, rel=1e-6)
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)
    row0 = 0.9 * softplus(-0.2) + 0.1 * softplus(0.2)
    assert smoothed.item() == pytest.approx((row0 + math.log(2)) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.7)


def test_dpo_loss_stable_for_large_margins_and_has_gradient():
    pc = t([500.0, -500.0]).requires_grad_()
    loss, chosen, _ = dpo_loss(pc, torch.zeros(2), torch.zeros(2), torch.zeros(2), beta=2.0)
    assert loss.item() == pytest.approx(1000.0 / 2)
    loss.backward()
    assert torch.isfinite(pc.grad).all() and not chosen.requires_grad
    torch.testing.assert_close(pc.grad, t([0.0, -1.0]))  # -beta*sigmoid(-z)/B


def test_bradley_terry_loss_by_hand():
    loss = bradley_terry_loss(t([2.0, 0.0, 1000.0]), t([1.0, 0.0, -1000.0]))
    assert loss.item() == pytest.approx((softplus(-1.0) + math.log(2) + 0.0) / 3, rel=1e-6)


def test_sequence_logprob_and_sft_nll():
    token_logp = t([[-1.0, -2.0, -3.0], [-0.5, float("-inf"), float("-inf")]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    torch.testing.assert_close(sequence_logprob(token_logp, mask), t([-6.0, -0.5]))
    assert sft_nll_loss(token_logp, mask).item() == pytest.approx(6.5 / 4)
    assert sft_nll_loss(token_logp, mask, agg="seq-mean-token-mean").item() == pytest.approx((2.0 + 0.5) / 2)


@pytest.mark.parametrize(("estimator", "pulls"), [("k1", False), ("k2", True), ("k3", True)])
def test_kl_in_the_loss_pulls_the_policy_to_the_reference_except_k1(estimator: str, pulls: bool) -> None:
    """GRPO's KL loss term on on-policy samples: the expected gradient of β·E[k1] is β·E[∇log π] = 0,
    so k1 leaves the policy where it is; k2 and k3 move it towards π_ref."""
    gen = torch.Generator().manual_seed(0)
    ref = torch.log_softmax(torch.tensor([2.0, 0.0, -1.0, 0.5]), -1)
    logits = torch.tensor([-1.0, 1.5, 0.0, 0.3], requires_grad=True)
    true_kl = []
    for _ in range(60):
        logp_all = torch.log_softmax(logits, -1)
        samples = torch.multinomial(logp_all.detach().exp(), 4096, replacement=True, generator=gen)
        loss = kl_estimate(logp_all[samples], ref[samples], estimator).mean()
        (grad,) = torch.autograd.grad(loss, logits)
        with torch.no_grad():
            logits -= 0.5 * grad
            p = torch.softmax(logits, -1)
            true_kl.append(float((p * (p.log() - ref)).sum()))
    if pulls:
        assert true_kl[-1] < 0.2 * true_kl[0]
    else:
        assert true_kl[-1] > 0.8 * true_kl[0]  # only sampling noise moves it


# ----------------------------------------------------------------------------- GSPO


def gspo_case():
    """Row 0: log-ratios 0.1, -0.3 -> s = exp(-0.1), A = +1 (inside the clip);
    row 1: log-ratios 0.2, 0.1, 0.3 -> s = exp(0.2), A = +2 (above 1 + 0.1: clipped);
    row 2: an empty response. Padding holds garbage log-probs."""
    old = torch.full((3, 3), -1.0)
    logp = old + t([[0.1, -0.3, 40.0], [0.2, 0.1, 0.3], [7.0, 7.0, 7.0]])
    mask = t([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    return logp.requires_grad_(), old, t([1.0, 2.0, 5.0]), mask


S0, S1 = math.exp(-0.1), math.exp(0.2)


def test_gspo_clips_the_length_normalised_sequence_ratio_by_hand():
    logp, old, adv, mask = gspo_case()
    loss, stats = gspo_policy_loss(logp, old, adv, mask, clip_eps=0.05, clip_eps_high=0.1)
    # row 0: max(-1 * 0.9048, -1 * 0.95) = -0.9048; row 1: max(-2 * 1.2214, -2 * 1.1) = -2.2 (clipped)
    assert loss.item() == pytest.approx((-S0 - 2.2) / 2, abs=1e-6)  # mean over the two rows with tokens
    assert stats["clipfrac"].item() == pytest.approx(1 / 2)
    assert stats["ratio_mean"].item() == pytest.approx((S0 + S1) / 2, abs=1e-6)
    assert stats["ratio_max"].item() == pytest.approx(S1, abs=1e-6)
    _, ppo_stats = ppo_policy_loss(logp, old, adv, mask)
    assert stats["approx_kl"].item() == pytest.approx(ppo_stats["approx_kl"].item())  # the same token k3
    loss.backward()
    # d(-A s0)/dlogp_t = -A * s0 / |y_0| on row 0's tokens, over 2 rows; row 1 is clipped: no gradient
    expected = t([[-S0 / 2 / 2, -S0 / 2 / 2, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected)


def test_gspo_aggregation_modes_weight_each_sequence():
    logp, old, adv, mask = gspo_case()
    per_row = [-S0, -2.2]
    token_mean, _ = gspo_policy_loss(logp, old, adv, mask, 0.05, 0.1, agg="token-mean")
    assert token_mean.item() == pytest.approx((2 * per_row[0] + 3 * per_row[1]) / 5, abs=1e-6)
    dr, _ = gspo_policy_loss(logp, old, adv, mask, 0.05, 0.1, agg="seq-mean-token-sum-norm", agg_constant=4.0)
    assert dr.item() == pytest.approx((2 * per_row[0] + 3 * per_row[1]) / 4 / 3, abs=1e-6)  # over all 3 rows


def test_gspo_a_sequence_is_kept_or_cut_whole_where_ppo_cuts_tokens():
    """One token far off (ratio e^1) in a long response: PPO clips that token; GSPO's sequence ratio
    exp(1/10) is within a wide clip, so the whole sequence keeps its gradient."""
    old = torch.zeros(1, 10)
    logp = old.clone()
    logp[0, 0] = 1.0
    logp.requires_grad_()
    mask, adv = torch.ones(1, 10), t([1.0])
    _, ppo_stats = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    assert ppo_stats["clipfrac"].item() == pytest.approx(0.1)
    loss, stats = gspo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    assert stats["clipfrac"].item() == 0.0
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.full((1, 10), -math.exp(0.1) / 10))


def test_gspo_token_level_equals_gspo_with_sequence_advantages():
    """GSPO-token has GSPO's value and, with advantages constant over a row, its gradient; [B, T] advantages
    are read as their row means by the sequence variant."""
    logp, old, adv, mask = gspo_case()
    loss_seq, _ = gspo_policy_loss(logp, old, adv, mask, 0.05, 0.1)
    (grad_seq,) = torch.autograd.grad(loss_seq, logp)
    dense = adv.unsqueeze(1) * mask
    loss_tok, stats_tok = gspo_policy_loss(logp, old, dense, mask, 0.05, 0.1, token_level=True)
    (grad_tok,) = torch.autograd.grad(loss_tok, logp)
    assert loss_tok.item() == pytest.approx(loss_seq.item(), abs=1e-6)
    torch.testing.assert_close(grad_tok, grad_seq)
    assert stats_tok["clipfrac"].item() == pytest.approx(3 / 5)  # per token: row 1's three tokens
    loss_dense, _ = gspo_policy_loss(logp, old, dense, mask, 0.05, 0.1)
    assert loss_dense.item() == pytest.approx(loss_seq.item(), abs=1e-6)


def test_gspo_sequence_weights_scale_each_sequence():
    logp, old, adv, mask = gspo_case()
    loss, _ = gspo_policy_loss(logp, old, adv, mask, 0.05, 0.1, weights=t([0.5, 2.0, 9.0]))
    assert loss.item() == pytest.approx((0.5 * -S0 + 2.0 * -2.2) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="clip ranges"):
        gspo_policy_loss(logp, old, adv, mask, clip_eps=-0.1)


def test_sequence_importance_weights_by_hand():
    """min(exp(mean_t(log π_prox - log π_behaviour)), cap) per sequence; 0 for an empty row."""
    behaviour = torch.zeros(3, 3)
    prox = t([[0.2, 0.4, 9.0], [1.0, 1.2, 1.4], [3.0, 3.0, 3.0]])
    mask = t([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    weights, stats = sequence_importance_weights(prox, behaviour, mask, cap=2.0)
    torch.testing.assert_close(weights, t([math.exp(0.3), 2.0, 0.0]))
    assert stats["is_weight_mean"].item() == pytest.approx((math.exp(0.3) + 2.0) / 2, abs=1e-6)
    assert stats["is_weight_max"].item() == pytest.approx(math.exp(1.2), rel=1e-6)  # before truncation
    assert stats["is_clipped_frac"].item() == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="cap"):
        sequence_importance_weights(prox, behaviour, mask, cap=0.0)


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

"""Reference tests of the policy, value, preference and SFT losses in ``rayrlhf.algorithms`` (PPO with clip-higher
and truncated importance weights, GSPO, DPO, Bradley-Terry), against hand-computed values (CPU only, no Ray)."""

from __future__ import annotations

import math

import pytest
import torch
from by_hand import lengths_to_mask, softplus, t

from rayrlhf.algorithms import (
    aggregate_loss,
    bradley_terry_loss,
    dpo_loss,
    gspo_policy_loss,
    kl_estimate,
    ppo_policy_loss,
    sequence_importance_weights,
    sequence_logprob,
    sft_nll_loss,
    truncated_importance_weights,
    value_loss,
)

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

"""Pure-torch RLHF math: KL estimators/controllers, advantage estimators and losses.

No Ray or model code lives here, so every function can be unit-tested on CPU and reused by
any trainer actor.
"""

from .advantages import (
    gae,
    group_advantages,
    informative_groups,
    reinforce_pp_advantages,
    reinforce_pp_returns,
    rloo_advantages,
    soft_overlong_penalty,
    token_rewards,
)
from .kl import (
    KL_CONTROLLERS,
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    make_kl_controller,
)
from .losses import (
    AGG_MODES,
    aggregate_loss,
    bradley_terry_loss,
    dpo_loss,
    gspo_policy_loss,
    ppo_policy_loss,
    sequence_importance_weights,
    sequence_logprob,
    sft_nll_loss,
    truncated_importance_weights,
    value_loss,
)
from .passk import pass_at_k, sample_metrics
from .utils import explained_variance, masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "AGG_MODES",
    "KL_CONTROLLERS",
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate_loss",
    "bradley_terry_loss",
    "dpo_loss",
    "explained_variance",
    "gae",
    "group_advantages",
    "gspo_policy_loss",
    "informative_groups",
    "kl_estimate",
    "make_kl_controller",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "pass_at_k",
    "ppo_policy_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_returns",
    "rloo_advantages",
    "sample_metrics",
    "sequence_importance_weights",
    "sequence_logprob",
    "sft_nll_loss",
    "soft_overlong_penalty",
    "token_rewards",
    "truncated_importance_weights",
    "value_loss",
]

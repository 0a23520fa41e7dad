"""Config sections of what a job trains: models, reward, data and the algorithm.

Every section is a pydantic model that forbids unknown keys, so a typo in a YAML file or a
`--set` override is an error naming the key instead of a silently ignored setting. Every
knob has a default and a one-line description (shown by `rayrlhf validate`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ONLINE_ALGORITHMS = ("ppo", "grpo", "rloo", "reinforce_pp")
OFFLINE_ALGORITHMS = ("sft", "rm", "dpo")
GROUP_ALGORITHMS = ("grpo", "rloo")


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    policy: str = Field("tiny", description="Policy to train: a local directory, a hub id, or 'tiny' for the locally built test model.")
    critic: str | None = Field(None, description="Critic initialisation for PPO (a causal LM or reward model; a value head is added). Required by ppo.")
    reward: str | None = Field(None, description="Reward model (sequence classifier with one label); alternative to reward.function.")
    reference: str | None = Field(None, description="Frozen reference policy for the KL term; defaults to model.policy.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the model directory or hub repo.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype: 'auto' is bfloat16 on GPUs that support it and float32 on CPU."
    )
    disable_dropout: bool = Field(
        True, description="Zero every dropout of the policy, critic, reference and reward models (on, updates and "
        "scoring see different networks and the PPO ratio is not 1 on-policy)."
    )


class RewardConfig(Section):
    function: str | None = Field(None, description="Reward function 'path/to/file.py:fn' or 'package.module:fn'.")
    url: str | None = Field(None, description="Remote HTTP reward endpoint (POST JSON), alternative to a function or model.")
    timeout_s: float = Field(30.0, gt=0, description="Per-call timeout of a reward function or HTTP request, seconds.")
    max_retries: int = Field(2, ge=0, description="Retries of a failed HTTP reward request before the samples count as failed.")
    num_workers: int = Field(1, ge=1, description="Reward actors scoring in parallel.")
    clip: float | None = Field(None, gt=0, description="Clip each sample's score to [-clip, clip] before advantages; null disables.")
    normalize: Literal["none", "batch", "running"] = Field(
        "none", description="Score normalisation before advantages: none, per step (batch), or by running mean/std over the run."
    )
    auth_token_env: str | None = Field(
        None, description="Environment variable holding a token sent as 'Authorization: Bearer' to reward.url (never in the config)."
    )
    eval_function: str | None = Field(
        None, description="Held-out 'true' metric for evaluation rows (file.py:fn or module:fn), beside the training reward."
    )


class DataConfig(Section):
    train: str | None = Field(None, description="Training data: a jsonl or parquet file, or a dataset name.")
    eval: str | None = Field(None, description="Held-out data with the same fields as data.train.")
    pretrain: str | None = Field(None, description="Pretraining text (jsonl/parquet with a 'text' field) for the PPO-ptx term.")
    max_prompt_tokens: int = Field(256, ge=1, description="Longest prompt, in tokens, after the chat template.")
    overlong_prompts: Literal["error", "drop"] = Field(
        "error", description="What to do with a prompt longer than max_prompt_tokens: fail naming file and row, or drop and count."
    )
    apply_chat_template: bool = Field(
        True, description="Render prompts and conversations with the tokenizer's chat template when it has one "
        "(else prompts stay raw text and conversations get the plain '<role>: <content>' rendering)."
    )
    shuffle: bool = Field(True, description="Shuffle the training rows each epoch (seeded by `seed`).")
    prompt_key: str = Field("prompt", min_length=1, description="Column holding each row's prompt text.")
    messages_key: str = Field(
        "messages", min_length=1, description="Column holding a conversation (a list of {role, content}, with an "
        "optional 'tools' column of JSON schemas), used by a row instead of the prompt column (prompt and SFT data)."
    )

    @model_validator(mode="after")
    def _distinct_keys(self) -> DataConfig:
        if self.prompt_key == self.messages_key:
            raise ValueError(f"data.prompt_key and data.messages_key are both {self.prompt_key!r}; they name two columns")
        return self


class AlgorithmConfig(Section):
    name: Literal["ppo", "grpo", "rloo", "reinforce_pp", "sft", "rm", "dpo"] = Field(
        "grpo", description="Training algorithm: online RL (ppo, grpo, rloo, reinforce_pp) or offline (sft, rm, dpo)."
    )
    group_size: int | None = Field(
        None, ge=1, description="Samples per prompt; grpo and rloo need at least 2; null: 8 for grpo and rloo, 1 otherwise."
    )
    kl_coef: float = Field(0.02, ge=0, description="KL weight β (initial value when the controller is adaptive).")
    kl_estimator: Literal["k1", "k2", "k3"] | None = Field(
        None, description="KL estimator (k1 = d, k2 = d²/2, k3 = exp(-d)-1+d); null: k1 as a reward penalty, k3 as a loss term."
    )
    kl_in_reward: bool | None = Field(
        None, description="KL as a per-token reward penalty (true) or a loss term (false); default: ppo/rloo/reinforce_pp true, grpo false."
    )
    kl_controller: Literal["fixed", "adaptive"] = Field("fixed", description="Fixed β, or adaptive toward kl_target (Ziegler et al.).")
    kl_target: float = Field(6.0, gt=0, description="Target KL per sequence for the adaptive controller.")
    kl_horizon: int = Field(10000, gt=0, description="Horizon (in samples) of the adaptive KL controller.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor for GAE and REINFORCE++ returns.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ.")
    clip_eps: float = Field(0.2, gt=0, description="PPO ratio clip ε (lower side, and upper side unless clip_eps_high is set).")
    clip_eps_high: float | None = Field(None, gt=0, description="Upper PPO clip (DAPO's clip-higher); null uses clip_eps.")
    value_clip_eps: float = Field(0.2, gt=0, description="Clip range of the critic's value update.")
    ppo_epochs: int = Field(1, ge=1, description="Passes over each step's samples.")
    old_logprobs: Literal["auto", "recompute", "rollout"] = Field(
        "auto", description="PPO's old log-probs: auto (a step with one update uses its own forward, exact; else "
        "recompute), recompute (a trainer forward while rollouts stream), rollout (the engine's sampling log-probs)."
    )
    importance_cap: float = Field(
        2.0, gt=0, description="Asynchronous mode: truncation of the importance weight π_old/π_behaviour of stale samples (TIS)."
    )
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = Field(
        "token-mean", description="How per-token losses are reduced (seq-mean-token-sum-norm is Dr. GRPO's)."
    )
    scale_by_std: bool = Field(True, description="GRPO: divide group-centred scores by the group std (false is Dr. GRPO).")
    whiten_advantages: bool = Field(True, description="Whiten advantages over the batch (ppo, reinforce_pp).")
    overlong_penalty: float = Field(0.0, ge=0, description="Penalty subtracted from the score of a response cut by the length limit.")
    ptx_coef: float = Field(0.0, ge=0, description="PPO-ptx weight γ on the pretraining NLL (InstructGPT: 27.8); needs data.pretrain.")
    beta: float = Field(0.1, gt=0, description="DPO β.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="DPO label smoothing (conservative DPO).")

    @model_validator(mode="after")
    def _resolve_kl_estimator(self) -> AlgorithmConfig:
        """k1 is unbiased as a per-token reward penalty; as a loss term its gradient is zero in expectation
        on on-policy samples (E[∇log π] = 0), so the default there is GRPO's k3."""
        if self.group_size is None:
            self.__dict__["group_size"] = 8 if self.name in GROUP_ALGORITHMS else 1
        if self.kl_estimator is None:
            self.__dict__["kl_estimator"] = "k1" if self.kl_as_reward else "k3"
        elif self.kl_estimator == "k1" and not self.kl_as_reward and self.kl_coef > 0 and self.is_online:
            raise ValueError(
                "algorithm.kl_estimator=k1 with the KL as a loss term (algorithm.kl_in_reward false) does not pull "
                "the policy to the reference: its gradient is zero in expectation on on-policy samples; use k3 "
                "(GRPO's) or k2 (whose gradient is that of KL(π‖π_ref))"
            )
        return self

    @property
    def is_online(self) -> bool:
        return self.name in ONLINE_ALGORITHMS

    @property
    def needs_reference(self) -> bool:
        """Whether any KL to the reference is computed (β > 0, or an adaptive β that may become > 0)."""
        return self.kl_coef > 0 or self.kl_controller == "adaptive"

    @property
    def kl_as_reward(self) -> bool:
        """Whether the KL enters as a token reward penalty (InstructGPT) rather than a loss term (GRPO)."""
        return self.kl_in_reward if self.kl_in_reward is not None else self.name != "grpo"

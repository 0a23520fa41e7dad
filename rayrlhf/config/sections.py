"""Config sections of what a job trains: models, reward, data and the algorithm.

Every section is a pydantic model that forbids unknown keys, so a typo in a YAML file or a
`--set` override is an error naming the key instead of a silently ignored setting. Every
knob has a default and a one-line description (shown by `rayrlhf validate`).
"""

from __future__ import annotations

import logging
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)

ONLINE_ALGORITHMS = ("ppo", "grpo", "rloo", "reinforce_pp")
OFFLINE_ALGORITHMS = ("sft", "rm", "dpo")
GROUP_ALGORITHMS = ("grpo", "rloo")
# The clip ranges each policy loss gets when algorithm.clip_eps / clip_eps_high are null: PPO's
# token ratios move by tenths, GSPO's length-normalised sequence ratio by ten-thousandths (the
# GSPO paper's 3e-4 / 4e-4).
DEFAULT_CLIP = {"ppo": (0.2, None), "gspo": (3e-4, 4e-4), "gspo_token": (3e-4, 4e-4)}
# The step metrics reward/<name> already taken: a reward.functions entry may not be named so.
RESERVED_REWARD_NAMES = ("mean", "std", "failed")


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Section):
    """A LoRA adapter (peft) trained instead of the whole model (`model.lora`)."""

    rank: int = Field(16, ge=1, le=512, description="Rank r of each adapter (A is r x in, B is out x r); vLLM serves up to 512.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha: the update is (alpha / rank) * B @ A.")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on the adapter's input while training (0 keeps the PPO ratio of "
        "on-policy samples at 1, as model.disable_dropout does for the base model)."
    )
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="Layers that get an adapter: all-linear (every linear layer but the output layer, "
        "a classification head and MoE routers), or a list of layer names such as [q_proj, v_proj]."
    )
    sync: Literal["auto", "adapter", "merged"] = Field(
        "auto", description="What a weight sync sends the engines: adapter (the LoRA tensors only, into vLLM's LoRA "
        "slots), merged (full weights with the adapter merged in), auto (adapter where the engine can serve it)."
    )
    probe_atol: float | None = Field(
        None, gt=0, description="Largest engine/trainer log-prob gap on the probe after an adapter sync; null: 1e-3 "
        "with float32 engines, 0.1 with 16-bit ones."
    )

    @model_validator(mode="after")
    def _names(self) -> LoraConfig:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules is an empty list: name at least one layer, or use all-linear")
        return self


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
    lora: LoraConfig | None = Field(
        None, description="Train a LoRA adapter instead of the whole model: the policy (online RL, sft, dpo) or the "
        "reward model (rm); the reference is then the policy with its adapter off. null: full fine-tuning."
    )


class RewardFunctionConfig(Section):
    """One term of a weighted reward (`reward.functions`)."""

    function: str = Field(description="Reward function 'path/to/file.py:fn' or 'package.module:fn'.")
    weight: float = Field(1.0, allow_inf_nan=False, description="Weight of this function's score in the sum (0: logged only).")
    name: str | None = Field(None, description="Name of its metric reward/<name>; null: the function's name.")

    @model_validator(mode="after")
    def _resolve_name(self) -> RewardFunctionConfig:
        if self.name is None:
            self.__dict__["name"] = self.function.rpartition(":")[2]
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name or ""):
            raise ValueError(f"name {self.name!r}: a metric name takes letters, digits, '_', '.' and '-' only")
        if self.name in RESERVED_REWARD_NAMES:
            raise ValueError(f"name {self.name!r} would collide with the metric reward/{self.name}; choose another name")
        return self


class RewardConfig(Section):
    function: str | None = Field(None, description="Reward function 'path/to/file.py:fn' or 'package.module:fn'.")
    functions: list[RewardFunctionConfig] | None = Field(
        None, min_length=1, description="Weighted reward functions [{function, weight, name}], alternative to reward.function: "
        "the score is the weighted sum; a sample is unscored when a function with a non-zero weight gives it none."
    )
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

    @model_validator(mode="after")
    def _distinct_names(self) -> RewardConfig:
        """Each function's metric is reward/<name>: two entries of one name would overwrite each other."""
        seen: dict[str, int] = {}
        for i, entry in enumerate(self.functions or []):
            if entry.name in seen:
                raise ValueError(
                    f"reward.functions[{seen[entry.name]}] and reward.functions[{i}] are both named {entry.name!r}: "
                    "their metrics reward/<name> would collide; set a distinct `name` on one of them"
                )
            seen[entry.name] = i
        return self


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
    policy_loss: Literal["ppo", "gspo", "gspo_token"] = Field(
        "ppo", description="Policy loss: ppo (token ratios clipped per token), gspo (length-normalised sequence ratio "
        "clipped per sequence, Qwen3's GSPO; needs grpo or rloo), gspo_token (GSPO with per-token advantages)."
    )
    clip_eps: float | None = Field(
        None, gt=0, description="Ratio clip ε (lower side, and upper side unless clip_eps_high is set); null: 0.2 for "
        "ppo, 3e-4 for gspo (its sequence ratio stays near 1: PPO-size ranges clip nothing)."
    )
    clip_eps_high: float | None = Field(
        None, gt=0, description="Upper clip (DAPO's clip-higher); null: clip_eps, or 4e-4 for gspo when clip_eps is null too."
    )
    value_clip_eps: float = Field(0.2, gt=0, description="Clip range of the critic's value update.")
    ppo_epochs: int = Field(1, ge=1, description="Passes over each step's samples.")
    old_logprobs: Literal["auto", "recompute", "rollout"] = Field(
        "auto", description="PPO's old log-probs: auto (a step with one update uses its own forward, exact; else "
        "recompute), recompute (a trainer forward while rollouts stream), rollout (the engine's sampling log-probs)."
    )
    importance_cap: float = Field(
        2.0, gt=0, description="Asynchronous mode: truncation of the importance weight π_old/π_behaviour of stale samples (TIS)."
    )
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] | None = Field(
        None, description="How per-token losses are reduced (seq-mean-token-sum-norm is Dr. GRPO's); null: token-mean, "
        "or seq-mean-token-mean (the paper's mean over sequences) with policy_loss gspo."
    )
    scale_by_std: bool = Field(True, description="GRPO: divide group-centred scores by the group std (false is Dr. GRPO).")
    whiten_advantages: bool = Field(True, description="Whiten advantages over the batch (ppo, reinforce_pp).")
    overlong_penalty: float = Field(0.0, ge=0, description="Penalty subtracted from the score of a response cut by the length limit.")
    overlong_filter: bool = Field(
        False, description="Leave responses cut by the length limit out of the policy loss, KL and entropy (DAPO); "
        "their scores still count in their group's baseline."
    )
    overlong_buffer: int = Field(
        0, ge=0, description="DAPO's soft overlong penalty: the last this many tokens before rollout.max_new_tokens "
        "cost linearly up to overlong_penalty_factor; 0 disables."
    )
    overlong_penalty_factor: float = Field(1.0, ge=0, description="Largest soft overlong penalty (at and past the length limit).")
    dynamic_sampling: bool = Field(
        False, description="DAPO's dynamic sampling: drop prompt groups whose scores are all equal and draw more prompts "
        "until the step has schedule.prompts_per_step informative groups (needs group_size >= 2)."
    )
    max_gen_batches: int = Field(
        4, ge=1, description="Dynamic sampling: most generation rounds of prompts_per_step prompts per step; past it the "
        "step trains on the informative groups it has (rollout/informative_frac < 1)."
    )
    ptx_coef: float = Field(0.0, ge=0, description="PPO-ptx weight γ on the pretraining NLL (InstructGPT: 27.8); needs data.pretrain.")
    beta: float = Field(0.1, gt=0, description="DPO β.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="DPO label smoothing (conservative DPO).")

    @model_validator(mode="after")
    def _resolve_kl_estimator(self) -> AlgorithmConfig:
        """k1 is unbiased as a per-token reward penalty; as a loss term its gradient is zero in expectation
        on on-policy samples (E[∇log π] = 0), so the default there is GRPO's k3."""
        self._resolve_policy_loss()
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

    def _resolve_policy_loss(self) -> None:
        """Clip ranges and aggregation follow the policy loss when left null; GSPO's sequence-level clip
        needs one advantage per sequence, which ppo (GAE) and reinforce_pp (reward-to-go) do not give."""
        low, high = DEFAULT_CLIP[self.policy_loss]
        if self.clip_eps is None:
            self.__dict__["clip_eps"] = low
            if self.clip_eps_high is None:
                self.__dict__["clip_eps_high"] = high
        if self.loss_agg is None:
            self.__dict__["loss_agg"] = "seq-mean-token-mean" if self.policy_loss == "gspo" else "token-mean"
        if self.policy_loss == "ppo":
            return
        if self.policy_loss == "gspo" and self.is_online and self.name not in GROUP_ALGORITHMS:
            raise ValueError(
                f"algorithm.policy_loss=gspo clips one ratio per sequence and needs one advantage per sequence "
                f"(algorithm.name grpo or rloo); algorithm.name={self.name} gives per-token advantages: use "
                "policy_loss gspo_token"
            )
        widest = max(self.clip_eps, self.clip_eps_high or self.clip_eps)
        if widest > 0.01:
            log.warning(
                "algorithm.policy_loss=%s with a clip range of %g: GSPO's length-normalised sequence ratio stays within "
                "~1e-3 of 1, so a PPO-size range clips nothing; the GSPO paper uses clip_eps 3e-4, clip_eps_high 4e-4 "
                "(the defaults when both are null)", self.policy_loss, widest,
            )

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

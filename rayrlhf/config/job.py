"""The whole job: every section, and the checks that span sections."""

from __future__ import annotations

from pydantic import Field, model_validator

from rayrlhf.config.env import EnvConfig
from rayrlhf.config.runtime import (
    CheckpointConfig,
    FaultsConfig,
    LoggingConfig,
    RayConfig,
    RolloutConfig,
    ScheduleConfig,
    ServersConfig,
    TrainerConfig,
)
from rayrlhf.config.sections import (
    GROUP_ALGORITHMS,
    AlgorithmConfig,
    DataConfig,
    ModelConfig,
    RewardConfig,
    Section,
)


class JobConfig(Section):
    seed: int = Field(0, description="Seed for data order, sampling and initialisation.")
    output_dir: str = Field("outputs/run", description="Where config.yaml, metrics.jsonl, checkpoints/ and final/ go.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Models.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward source for online RL.")
    data: DataConfig = Field(default_factory=DataConfig, description="Datasets.")
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig, description="Algorithm and its hyper-parameters.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout workers.")
    env: EnvConfig = Field(
        default_factory=EnvConfig, description="Multi-turn environments and tools (user code, run isolated)."
    )
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="DeepSpeed trainer groups.")
    servers: ServersConfig = Field(default_factory=ServersConfig, description="Reference and reward servers; weight sync.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="Steps and batch sizes.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpointing.")
    faults: FaultsConfig = Field(default_factory=FaultsConfig, description="Restarts, timeouts and heartbeats (fault tolerance).")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray connection.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metrics export: Ray metrics, TensorBoard, W&B.")

    @property
    def max_total_tokens(self) -> int:
        """Longest conversation of a multi-turn episode, prompt included: rollout.max_total_tokens, or by default
        the prompt plus env.max_turns turns of rollout.max_new_tokens and as much again for the environment's replies."""
        r = self.rollout
        return r.max_total_tokens or self.data.max_prompt_tokens + 2 * self.env.max_turns * r.max_new_tokens

    @property
    def samples_per_step(self) -> int:
        return self.schedule.prompts_per_step * self.algorithm.group_size

    @model_validator(mode="after")
    def _cross_checks(self) -> JobConfig:
        """Catch combinations that would fail deep inside a run, naming the keys involved."""
        algo = self.algorithm
        if algo.name == "ppo" and self.model.critic is None:
            raise ValueError(
                "algorithm.name=ppo needs a critic: set model.critic (for example the reward model or the policy's path)"
            )
        if algo.name in GROUP_ALGORITHMS and algo.group_size < 2:
            raise ValueError(f"algorithm.name={algo.name} needs algorithm.group_size >= 2 (got {algo.group_size})")
        if algo.dynamic_sampling and not algo.is_online:
            raise ValueError(f"algorithm.dynamic_sampling filters groups of online rollouts; algorithm.name={algo.name} is offline")
        if algo.dynamic_sampling and algo.group_size < 2:
            raise ValueError(
                f"algorithm.dynamic_sampling keeps groups whose scores differ: it needs algorithm.group_size >= 2 "
                f"(got {algo.group_size})"
            )
        if algo.ptx_coef > 0 and self.data.pretrain is None:
            raise ValueError("algorithm.ptx_coef > 0 (PPO-ptx) needs data.pretrain")
        problem = precision_conflict(self.model.dtype, self.trainer.bf16)
        if problem:
            raise ValueError(problem)
        if self.checkpoint.every is None:
            self.checkpoint.__dict__["every"] = max(1, self.schedule.steps // 10)
        if self.reward.url:
            _check_no_secret_in_url(self.reward.url)
        if algo.is_online and self.data.train is None:
            raise ValueError(f"algorithm.name={algo.name} needs data.train: a jsonl/parquet file or dataset with a 'prompt' field")
        if algo.is_online:
            given = {"model.reward": self.model.reward, "reward.function": self.reward.function,
                     "reward.functions": self.reward.functions, "reward.url": self.reward.url}
            sources = [key for key, value in given.items() if value]
            if len(sources) > 1 or (not sources and not self.env.enabled):
                raise ValueError(
                    f"algorithm.name={algo.name} needs exactly one reward source: model.reward, reward.function, "
                    f"reward.functions or reward.url (got {' and '.join(sources) if sources else 'none'}); with an "
                    "environment (env.class or env.tools) the turn rewards alone may do"
                )
            if self.env.enabled and self.max_total_tokens < self.data.max_prompt_tokens + self.rollout.max_new_tokens:
                raise ValueError(
                    f"rollout.max_total_tokens = {self.max_total_tokens} leaves no room for a turn: it must be at least "
                    f"data.max_prompt_tokens + rollout.max_new_tokens = {self.data.max_prompt_tokens + self.rollout.max_new_tokens}"
                )
            if algo.overlong_buffer >= self.rollout.max_new_tokens:
                raise ValueError(
                    f"algorithm.overlong_buffer = {algo.overlong_buffer} must be smaller than rollout.max_new_tokens = "
                    f"{self.rollout.max_new_tokens}: the soft overlong penalty ramps over the buffer's last tokens before the limit"
                )
            self._check_batch_split()
        return self

    def _check_batch_split(self) -> None:
        n = self.samples_per_step
        mini = self.trainer.mini_batch_size or n
        where = f"schedule.prompts_per_step * algorithm.group_size = {n}"
        if n % mini:
            raise ValueError(f"{where} must be divisible by trainer.mini_batch_size = {mini}")
        roles = [("policy", self.trainer.policy)]
        if self.algorithm.name == "ppo":
            roles.append(("critic", self.trainer.critic))
        for role, cfg in roles:
            if mini % cfg.num_ranks:
                raise ValueError(
                    f"the mini-batch of {mini} samples ({'trainer.mini_batch_size' if self.trainer.mini_batch_size else where}) "
                    f"must split evenly over trainer.{role}.num_ranks = {cfg.num_ranks}"
                )


def precision_conflict(dtype: str, bf16: bool | None) -> str | None:
    """Why `model.dtype` and `trainer.bf16` cannot train together, or None (see loading.training_precision)."""
    if bf16 is False and dtype in ("bfloat16", "float16"):
        return (f"trainer.bf16: false with model.dtype: {dtype} would run AdamW on {dtype} weights with no float32 "
                "master copy (updates smaller than the weights' precision round away); set trainer.bf16: true (mixed "
                "precision keeps float32 master weights) or model.dtype: float32")
    return None


_SECRET_QUERY_KEYS = ("token", "key", "secret", "password", "auth", "signature", "sig", "credential")


def _check_no_secret_in_url(url: str) -> None:
    """A config is written to output_dir, W&B and submitted jobs: credentials belong in the environment."""
    from urllib.parse import parse_qsl, urlsplit

    parts = urlsplit(url)
    secret_keys = [k for k, _ in parse_qsl(parts.query) if any(s in k.lower() for s in _SECRET_QUERY_KEYS)]
    if parts.username or parts.password or secret_keys:
        raise ValueError(
            "reward.url carries credentials (" + ("user:password@" if parts.username else ", ".join(secret_keys)) + "); "
            "configs are written to output_dir, W&B and submitted jobs, so put the token in an environment variable "
            "and name it in reward.auth_token_env (sent as 'Authorization: Bearer <token>')"
        )

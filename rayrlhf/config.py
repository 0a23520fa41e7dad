"""Typed configuration for one rayrlhf job.

Every section is a pydantic model that forbids unknown keys, so a typo in a YAML file or a
`--set` override is an error naming the key instead of a silently ignored setting. Every
knob has a default and a one-line description (shown by `rayrlhf validate`).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, model_validator

from rayrlhf.errors import InvalidInput

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
    apply_chat_template: bool = Field(True, description="Wrap prompts with the tokenizer's chat template when it has one.")
    shuffle: bool = Field(True, description="Shuffle the training rows each epoch (seeded by `seed`).")


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


class RolloutConfig(Section):
    backend: Literal["auto", "vllm", "hf"] = Field(
        "auto", description="Generation engine: vllm, transformers generate ('hf'), or auto (hf for a CPU worker and a "
        "local model under 1 GB, where its lower per-step overhead wins; vllm otherwise)."
    )
    num_workers: int = Field(1, ge=1, description="Rollout worker actors, one engine each.")
    max_new_tokens: int = Field(64, ge=1, description="Longest response, in tokens.")
    min_new_tokens: int = Field(0, ge=0, description="Shortest response, in tokens (end-of-sequence is not sampled before).")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    top_k: int = Field(-1, description="Top-k sampling; -1 disables.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Engine dtype; 'auto' follows model.dtype.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism (GPUs per worker).")
    gpu_memory_utilization: float = Field(
        0.2, gt=0, le=1, description="vLLM memory share (on CPU, of NUMA node 0's memory; the vLLM default 0.92 fails there)."
    )
    max_model_len: int | None = Field(None, ge=16, description="Engine context length; default max_prompt_tokens + max_new_tokens.")
    enforce_eager: bool = Field(True, description="Disable CUDA graphs in vLLM (faster start, slower decode).")
    micro_batch_size: int = Field(8, ge=1, description="Completions per scoring micro-batch streamed to the scorers.")
    max_num_seqs: int | None = Field(None, ge=1, description="Sequences an engine decodes at once (vLLM max_num_seqs); null: engine default.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per rollout worker actor.")
    num_threads: int | None = Field(
        None, ge=1, description="CPU threads per engine (OpenMP); null: the node's cores shared by the workers and their TP ranks."
    )
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per rollout worker actor (tensor_parallel_size on GPU clusters).")
    cpus: list[NonNegativeInt] | None = Field(
        None, min_length=1, description="CPU cores the rollout workers run on (affinity, e.g. [0]); null: any. Keeps generation off the trainers' cores."
    )


class RoleConfig(Section):
    num_ranks: int = Field(1, ge=1, description="Data-parallel ranks (actors) in this trainer group.")
    lr: float = Field(1e-6, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up, in optimizer steps.")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field("constant", description="Learning-rate schedule after warm-up.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per rank.")
    num_threads: int | None = Field(
        None, ge=1, description="CPU threads per rank (torch); null: the node's cores shared by the group's ranks."
    )
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per rank.")
    cpus: list[NonNegativeInt] | None = Field(None, min_length=1, description="CPU cores this group's ranks run on (affinity, e.g. [1]); null: any.")


class TrainerConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] | None = Field(
        None, description="DeepSpeed ZeRO stage; null: 0 for a group of one rank (partitioning buys nothing), 2 otherwise."
    )
    micro_batch_size: int | None = Field(
        None, ge=1, description="Samples per rank per forward/backward pass; null: as many as fit micro_batch_tokens."
    )
    micro_batch_tokens: int = Field(
        8192, ge=1, description="Rows x padded length per pass when micro_batch_size is null (each pass trims its padding)."
    )
    mini_batch_size: int | None = Field(
        None, ge=1, description="Samples per optimizer step across all ranks; default: all samples of a step (one update per epoch)."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    bf16: bool | None = Field(None, description="bfloat16 mixed precision; default: on where the GPU supports it, off on CPU.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    policy: RoleConfig = Field(default_factory=RoleConfig, description="The policy trainer group.")
    critic: RoleConfig = Field(default_factory=lambda: RoleConfig(lr=5e-6), description="The critic trainer group (ppo only).")

    def stage_for(self, num_ranks: int) -> int:
        """The ZeRO stage a group of `num_ranks` ranks runs: zero_stage, or by default 0 for one rank, 2 for more."""
        return self.zero_stage if self.zero_stage is not None else (0 if num_ranks == 1 else 2)


class ServersConfig(Section):
    reference_num_cpus: float = Field(0.5, ge=0, description="CPUs reserved by the frozen reference server.")
    reference_num_gpus: float = Field(0.0, ge=0, description="GPUs reserved by the frozen reference server.")
    reward_num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per reward server.")
    reward_num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per reward server (a reward model on GPU).")
    micro_batch_size: int = Field(16, ge=1, description="Rows per forward pass in the reference and reward servers.")
    weight_sync_bucket_mb: int = Field(256, ge=1, description="Size of the buckets the weights travel in during a sync, MiB.")
    weight_sync_backend: Literal["object_store", "collective"] = Field("object_store", description="Weight sync transport: the object store (zero-copy on a node), or a broadcast group from policy rank 0 (gloo; NCCL on GPU clusters).")


class ScheduleConfig(Section):
    steps: int = Field(10, ge=1, description="Training steps (online RL: rollout + update; offline: optimizer steps).")
    prompts_per_step: int = Field(8, ge=1, description="Prompts per step; each is sampled algorithm.group_size times.")
    epochs: int = Field(1, ge=1, description="Offline algorithms: passes over data.train (steps caps the total).")
    eval_every: int = Field(0, ge=0, description="Evaluate on data.eval every N steps (0: only at the end).")
    eval_decoding: Literal["greedy", "sampled", "both"] = Field(
        "greedy", description="Online evaluation: greedy responses, sampled ones (rollout.temperature), or both."
    )
    eval_max_prompts: int | None = Field(None, ge=1, description="Online evaluation: use at most this many data.eval prompts.")
    verify_sync_every: int = Field(
        10, ge=0, description="Verify worker weights by checksum at the first sync and every N syncs after (0 disables)."
    )
    max_staleness: int = Field(
        0, ge=0, description="Asynchronous mode: step s may train on samples of weights s-1-k at the oldest (0: on-policy; "
        "k >= 1 generates the next k steps' samples while this one trains)."
    )


class CheckpointConfig(Section):
    every: int | None = Field(
        None, ge=0, description="Save a resumable checkpoint every N steps; null: every 10% of schedule.steps; 0: never."
    )
    keep_last: int = Field(2, ge=1, description="Checkpoints kept on disk; older ones are deleted.")


class FaultsConfig(Section):
    max_restarts: int = Field(3, ge=0, description="Restarts of each rollout worker, reference and reward server before it counts as lost.")
    trainer_restarts: int = Field(
        2, ge=0, description="Times the trainer groups are rebuilt from the latest checkpoint after a rank dies or hangs."
    )
    restart_timeout_s: float = Field(600.0, gt=0, description="How long to wait for a restarted actor (engine start included), s.")
    generation_timeout_s: float = Field(
        120.0, gt=0, description="A rollout worker with work that returns no sample for this long (+ the per-token part) is hung, s."
    )
    generation_timeout_per_token_s: float = Field(
        0.1, ge=0, description="Seconds added to generation_timeout_s per token of rollout.max_new_tokens."
    )
    score_timeout_s: float = Field(300.0, gt=0, description="Longest call to a reference or reward server before it is hung, s.")
    train_timeout_s: float = Field(1800.0, gt=0, description="Longest trainer-group call (a train step, a forward, a save) before a rank is hung, s.")
    sync_timeout_s: float = Field(600.0, gt=0, description="Longest weight sync to the rollout workers before a worker is hung, s.")
    heartbeat_s: float = Field(60.0, gt=0, description="Log what the driver waits on every this many seconds while a phase runs long.")


class RayConfig(Section):
    address: str | None = Field(None, description="Ray cluster address; default RAY_ADDRESS, else an embedded local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded local Ray (default: all).")
    include_dashboard: bool = Field(True, description="Start the dashboard with the embedded local Ray.")
    dashboard_host: str = Field("127.0.0.1", description="Dashboard bind address of the embedded Ray; localhost by default.")


class LoggingConfig(Section):
    ray_metrics: bool = Field(True, description="Export step metrics through ray.util.metrics (node Prometheus endpoint, dashboard Metrics view).")
    in_flight_poll_s: float = Field(2.0, ge=0, description="How often the driver samples in-flight samples per rollout worker for the metrics, s (0 disables).")
    tensorboard: bool = Field(False, description="Write TensorBoard event files to output_dir/tensorboard (needs the tensorboard package).")
    wandb_project: str | None = Field(None, description="Weights & Biases project; null disables. The API key is read only from WANDB_API_KEY.")
    wandb_entity: str | None = Field(None, description="Weights & Biases entity (team or user); default: the key's default entity.")
    run_name: str | None = Field(None, description="Run name for metric tags, TensorBoard and W&B; default: the last part of output_dir.")


class JobConfig(Section):
    seed: int = Field(0, description="Seed for data order, sampling and initialisation.")
    output_dir: str = Field("outputs/run", description="Where config.yaml, metrics.jsonl, checkpoints/ and final/ go.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Models.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward source for online RL.")
    data: DataConfig = Field(default_factory=DataConfig, description="Datasets.")
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig, description="Algorithm and its hyper-parameters.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout workers.")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="DeepSpeed trainer groups.")
    servers: ServersConfig = Field(default_factory=ServersConfig, description="Reference and reward servers; weight sync.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="Steps and batch sizes.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpointing.")
    faults: FaultsConfig = Field(default_factory=FaultsConfig, description="Restarts, timeouts and heartbeats (fault tolerance).")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray connection.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metrics export: Ray metrics, TensorBoard, W&B.")

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
        if algo.ptx_coef > 0 and self.data.pretrain is None:
            raise ValueError("algorithm.ptx_coef > 0 (PPO-ptx) needs data.pretrain")
        if self.checkpoint.every is None:
            self.checkpoint.__dict__["every"] = max(1, self.schedule.steps // 10)
        if self.reward.url:
            _check_no_secret_in_url(self.reward.url)
        if algo.is_online and self.data.train is None:
            raise ValueError(f"algorithm.name={algo.name} needs data.train: a jsonl/parquet file or dataset with a 'prompt' field")
        if algo.is_online:
            sources = [s for s in (self.model.reward, self.reward.function, self.reward.url) if s]
            if len(sources) != 1:
                raise ValueError(
                    f"algorithm.name={algo.name} needs exactly one reward source: model.reward, reward.function or reward.url "
                    f"(got {len(sources)})"
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


# ---------------------------------------------------------------------------------------------
# Loading: YAML file + `--set a.b=c` overrides -> validated JobConfig, with errors that name
# the key, the file and the line.
# ---------------------------------------------------------------------------------------------


class ConfigError(InvalidInput):
    """Invalid configuration; the message names the key, file and line and is shown without traceback."""


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML document to its 1-based line number."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*path, str(key_node.value))
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one `a.b=c` override; the value is read as YAML so `3`, `true`, `null`, `[1, 2]` get their types."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example --set algorithm.kl_coef=0.05")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc.problem})") from None
    return key.strip().split("."), value


def _apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        section = path[: i + 1]
        if part in _field_names(JobConfig, tuple(path[:i])) and not _is_section(JobConfig, tuple(section)):
            raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(section)} is a value, not a section")
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(section)} is not a mapping in the config file")
        node = child
    node[path[-1]] = value


def _section_model(model: type[BaseModel], path: tuple[str, ...]) -> type[BaseModel] | None:
    """The pydantic model of the section at `path`, or None when `path` is not a section."""
    for part in path:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _is_section(model: type[BaseModel], path: tuple[str, ...]) -> bool:
    return _section_model(model, path) is not None


def _field_names(model: type[BaseModel], path: tuple[str, ...]) -> list[str]:
    """The valid keys of the section at `path`, to suggest a fix for a misspelt key."""
    section = _section_model(model, path)
    return list(section.model_fields) if section else []


def _describe(error: dict[str, Any], source: str, lines: dict[tuple[str, ...], int], overridden: set[str]) -> str:
    loc = tuple(str(p) for p in error["loc"])
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc[-1], _field_names(JobConfig, loc[:-1]), n=1)
        why = "unknown key" + (f" (did you mean '{close[0]}'?)" if close else "")
    else:
        why = error["msg"].removeprefix("Value error, ")
    if not key:
        return why
    if key in overridden:
        where = "--set"
    elif loc in lines:
        where = f"{source}, line {lines[loc]}"
    else:
        where = source
    return f"{key}: {why} [{where}]"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read a job config from YAML (or defaults when `path` is None) and apply `--set` overrides."""
    source = str(path) if path is not None else "<defaults>"
    text = ""
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read the config file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text) if text else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    overridden = set()
    for item in overrides:
        keys, value = parse_override(item)
        _apply_override(data, keys, value)
        overridden.add(".".join(keys))
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        lines = _key_lines(text)
        messages = [_describe(e, source, lines, overridden) for e in exc.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(messages)) from None


def to_yaml(cfg: JobConfig) -> str:
    """The resolved config as YAML, as written to `output_dir/config.yaml` (it holds no secrets)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

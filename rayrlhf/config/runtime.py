"""Config sections of how a job runs: rollout workers, trainers, servers, schedule, checkpoints,
faults, Ray and logging."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

from rayrlhf.config.sections import Section


class RolloutConfig(Section):
    backend: Literal["auto", "vllm", "hf"] = Field(
        "auto", description="Generation engine: vllm, transformers generate ('hf'), or auto (hf for a CPU worker and a "
        "local model under 1 GB, where its lower per-step overhead wins; vllm otherwise)."
    )
    num_workers: int = Field(1, ge=1, description="Rollout worker actors, one engine each.")
    max_new_tokens: int = Field(64, ge=1, description="Longest response (multi-turn: longest assistant turn), in tokens.")
    max_total_tokens: int | None = Field(
        None, ge=16, description="Multi-turn episodes: longest conversation, prompt and every turn included; the episode "
        "ends when it is reached. null: data.max_prompt_tokens + 2 x env.max_turns x rollout.max_new_tokens."
    )
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
    dump_every: int = Field(0, ge=0, description="Write every sample of every Nth step to output_dir/samples/step_<N>.jsonl (0: never).")
    max_num_seqs: int | None = Field(None, ge=1, description="Sequences an engine decodes at once (vLLM max_num_seqs); null: engine default.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per rollout worker actor.")
    num_threads: int | None = Field(
        None, ge=1, description="CPU threads per engine (OpenMP); null: the node's cores shared by the workers and their TP ranks."
    )
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per rollout worker actor (tensor_parallel_size on GPU clusters).")
    cpus: list[NonNegativeInt] | None = Field(
        None, min_length=1, description="CPU cores the rollout workers run on (affinity, e.g. [0]); null: any. Keeps generation off the trainers' cores."
    )
    placement: Literal["pack", "spread"] = Field(
        "pack", description="Where Ray puts the rollout workers: pack (its default: fill nodes) or spread (one per node "
        "where it can, so a node lost takes fewer of them); a restarted worker goes wherever it fits."
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each rollout worker asks for (e.g. {rollout_node: 1} to "
        "keep workers on the nodes started with --resources='{\"rollout_node\": 4}')."
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
    placement: Literal["pack", "spread", "strict_spread", "strict_pack"] = Field(
        "pack", description="Placement-group strategy of this group's ranks: pack (few nodes), spread (many), strict_spread "
        "(one rank per node, or the group waits), strict_pack (one node)."
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each rank asks for (e.g. {trainer_node: 1})."
    )


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
    bf16: bool | None = Field(
        None, description="bfloat16 mixed precision (float32 master weights); default: on where the GPU supports it or "
        "model.dtype is bfloat16, else off and the trainers hold float32 weights. false with bfloat16/float16 weights is refused."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    offload: Literal["none", "optimizer", "all"] = Field(
        "none", description="ZeRO-Offload to host memory: the optimizer state (ZeRO >= 1), or with 'all' also the "
        "parameters (ZeRO-3); less GPU memory, slower steps (`rayrlhf plan` counts the host memory)."
    )
    partitioned_init: bool = Field(
        True, description="ZeRO-3: each rank builds the model already partitioned and the checkpoint is streamed in "
        "module by module (a rank's host memory falls with the group size); false: every rank loads it whole first."
    )
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
    colocate: bool = Field(
        False, description="Put the reference and each reward-model server beside a policy rank (reference beside "
        "policy-0, reward-i beside the next ranks), in the policy's placement group: on GPUs they take a fraction "
        "(servers.*_num_gpus, e.g. 0.25) of that rank's GPU instead of GPUs of their own."
    )
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
    eval_subset_seed: int | None = Field(
        None, description="Online evaluation: a subset of eval_max_prompts prompts drawn with this seed (the same at every "
        "evaluation); null: the first ones in file order."
    )
    eval_samples: int = Field(1, ge=1, description="Online evaluation: sampled responses per prompt (n of mean@n and pass@k).")
    eval_pass_k: list[PositiveInt] = Field(
        [1], min_length=1, description="Online evaluation: the k of each pass@k reported (each at most eval_samples)."
    )
    eval_pass_threshold: float = Field(
        1.0, description="Online evaluation: a sample is correct for pass@k when its score is at least this."
    )
    eval_max_new_tokens: int | None = Field(
        None, ge=1, description="Online evaluation: longest response, in tokens; null: rollout.max_new_tokens."
    )
    verify_sync_every: int = Field(
        10, ge=0, description="Verify worker weights by checksum at the first sync and every N syncs after (0 disables)."
    )
    max_staleness: int = Field(
        0, ge=0, description="Asynchronous mode: step s may train on samples of weights s-1-k at the oldest (0: on-policy; "
        "k >= 1 generates the next k steps' samples while this one trains)."
    )


    @model_validator(mode="after")
    def _check_eval_sampling(self) -> ScheduleConfig:
        """pass@k draws k of the n samples of a prompt; n greedy responses would be one response n times."""
        self.__dict__["eval_pass_k"] = sorted(set(self.eval_pass_k))
        too_big = [k for k in self.eval_pass_k if k > self.eval_samples]
        if too_big:
            raise ValueError(
                f"schedule.eval_pass_k {too_big} exceed schedule.eval_samples = {self.eval_samples}: pass@k draws k of the "
                "samples of each prompt"
            )
        if self.eval_samples > 1 and self.eval_decoding == "greedy":
            raise ValueError(
                f"schedule.eval_samples = {self.eval_samples} with schedule.eval_decoding=greedy: greedy responses to one "
                "prompt are all the same; use eval_decoding sampled (or both: one greedy response and n sampled)"
            )
        return self


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
    keep_synced_weights: bool | None = Field(
        None, description="Keep the last sync's weight buckets in the object store (one more copy of the policy) so a worker "
        "that restarts mid-rollout rejoins at once; null: on in asynchronous mode with the object-store sync."
    )
    max_failed_frac: float = Field(
        0.5, gt=0, le=1, description="Stop the job (after a checkpoint) when more than this share of the samples of the last "
        "failure_window steps could not be scored (reward, environment or scoring failures)."
    )
    failure_window: int = Field(3, ge=1, description="Steps over which faults.max_failed_frac is measured.")


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

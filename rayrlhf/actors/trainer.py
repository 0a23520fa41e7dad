"""One rank of a DeepSpeed ZeRO trainer group, as a Ray actor.

Every rank of a group receives the same call with its own contiguous shard of the rows, and
every rank must take part in every collective (ZeRO-3 gathers parameters inside each forward),
so all methods are called on all ranks together by `TrainerGroup`.

Gradient accumulation is driven by hand, not by DeepSpeed's micro-step counter: a step may hold
any number of micro-batches (and PPO-ptx adds passes), so before each backward the rank calls
``engine.set_gradient_accumulation_boundary(last_pass)``, backpropagates with
``scale_wrt_gas=False`` and calls ``engine.step()`` once at the end. The configured
``gradient_accumulation_steps`` only keeps DeepSpeed's batch-size bookkeeping consistent. Loss
normalisation (see `losses_step`) makes the gradient that of the global mini-batch loss: each
pass's loss is its exact share of that loss, multiplied by the world size to undo the gradient
averaging over ranks that ZeRO performs.
"""

from __future__ import annotations

import logging
import math
import os
import random
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F

from rayrlhf.actors.health import identity
from rayrlhf.actors.losses_step import (
    LOSS_ROLES,
    Batch,
    count_units,
    num_micro_batches,
    plan_passes,
    split_rows,
    sub_batch,
    trim_padding,
    validate,
)
from rayrlhf.actors.resources import default_threads, pin_to_cores
from rayrlhf.actors.trainer_weights import WeightsMixin, free_port
from rayrlhf.models.forward import sequence_scores, token_logprobs, token_values
from rayrlhf.models.loading import load_critic, load_policy, load_reward_model, training_precision
from rayrlhf.models.lora import LoraSpec
from rayrlhf.rng import rng_state, set_rng_state

log = logging.getLogger(__name__)

ROLES = ("policy", "critic", "reward")
_LOADERS = {"policy": load_policy, "critic": load_critic, "reward": load_reward_model}
__all__ = ["ROLES", "RoleModule", "TrainerRank", "TrainerSettings", "deepspeed_config", "free_port", "lr_lambda"]


def skip_shared_memory_op() -> None:
    """DeepSpeed loads a shared-memory all-reduce op for every CPU process group (2 s a start; on a fresh machine it
    JIT-compiles it first, about a minute on 2 cores), used only by its tensor-parallel inference. A group of one
    rank never communicates, so it goes without. (`import deepspeed.comm.torch as m` would bind the `torch`
    attribute deepspeed.comm re-exports, torch itself: the module is taken from sys.modules.)"""
    import importlib

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


@dataclass(frozen=True)
class TrainerSettings:
    """What one rank needs from the job config (built by `trainer_group.trainer_settings`)."""

    zero_stage: int = 2
    micro_batch_size: int | None = None  # None: rows per pass from micro_batch_tokens
    micro_batch_tokens: int = 8192
    gradient_accumulation_steps: int = 1
    lr: float = 1e-6
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    total_steps: int = 1
    max_grad_norm: float = 1.0
    bf16: bool | None = None  # None: on where CUDA supports bf16 or the weights are bf16 (loading.training_precision)
    gradient_checkpointing: bool = False
    offload: str = "none"  # none | optimizer | all (ZeRO-Offload to host memory)
    partitioned_init: bool = True  # ZeRO-3: build the model partitioned and stream the checkpoint in (models.partitioned)
    dtype: str = "auto"
    trust_remote_code: bool = False
    seed: int = 0
    temperature: float = 1.0  # sampling temperature the policy's log-probs are computed at
    disable_dropout: bool = True
    num_threads: int | None = None  # torch threads; None: the node's cores shared by the group's ranks
    cpus: list[int] | None = None  # cores the ranks are pinned to; None: any
    lora: LoraSpec | None = None  # train a LoRA adapter instead of the whole model (model.lora)


def deepspeed_config(s: TrainerSettings, world_size: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config of one rank (gradient accumulation is driven by hand, see the module docstring)."""
    zero: dict[str, Any] = {"stage": s.zero_stage}
    if s.offload in ("optimizer", "all"):  # the torch AdamW steps the host partition (no DeepSpeedCPUAdam JIT build)
        zero["offload_optimizer"] = {"device": "cpu"}
    if s.offload == "all":
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": s.micro_batch_size or 1,
        "gradient_accumulation_steps": s.gradient_accumulation_steps,
        "train_batch_size": (s.micro_batch_size or 1) * s.gradient_accumulation_steps * world_size,
        "gradient_clipping": s.max_grad_norm,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW: no JIT build of DeepSpeed's cpu_adam
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(settings: TrainerSettings) -> Any:
    """Multiplier of the peak LR for update s (0-based): linear warm-up, then constant/cosine/linear decay."""
    warmup, total, kind = settings.warmup_steps, max(settings.total_steps, 1), settings.lr_schedule

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return fn


class RoleModule(torch.nn.Module):
    """Wraps the HF model so DeepSpeed's engine runs the role's whole forward (its ZeRO hooks need that).

    The HF model sits under ``hf``; names exported to HF/vLLM drop that prefix.
    """

    def __init__(self, role: str, hf: torch.nn.Module) -> None:
        super().__init__()
        self.role = role
        self.hf = hf

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
        with_entropy: bool = False, temperature: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "mask": mask}
        if self.role == "policy":
            logp, entropy = token_logprobs(self.hf, batch, temperature, with_entropy)
            return {"logp": logp} if entropy is None else {"logp": logp, "entropy": entropy}
        if self.role == "critic":
            return {"values": token_values(self.hf, batch)}
        return {"scores": sequence_scores(self.hf, batch)}


@ray.remote
class TrainerRank(WeightsMixin):
    """One rank: holds a shard of the model, optimizer and LR schedule of a DeepSpeed engine.

    With `settings.lora`, the model carries a LoRA adapter (peft): only the adapter has gradients and
    optimizer state, and the base model with the adapter switched off is the frozen reference policy, computed
    here (`forward_logprobs(adapter=False)`) without a second copy of the weights.
    """

    def __init__(
        self, role: str, model_path: str, rank: int, world_size: int, master_addr: str | None,
        master_port: int | None, settings: TrainerSettings,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown trainer role {role!r}; valid roles are {list(ROLES)}")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.role, self.model_path, self.rank, self.world_size = role, str(model_path), rank, world_size
        self.master_addr = master_addr or ray.util.get_node_ip_address()
        self.master_port = master_port or (free_port() if rank == 0 else None)
        self.settings = settings
        self.engine: Any = None
        self.weight_group: Any = None
        self.peft: Any = None  # the peft wrapper of the model when it trains a LoRA adapter
        pin_to_cores(settings.cpus)
        torch.set_num_threads(
            settings.num_threads or default_threads(model_path, world_size, len(settings.cpus) if settings.cpus else None)
        )

    def identity(self) -> tuple[str, int]:
        """(node id, pid), for a stack dump from outside should this rank hang."""
        return identity()

    def master_address(self) -> tuple[str, int]:
        """Rank 0's node IP and a free port there, for the other ranks' rendezvous."""
        assert self.master_port is not None
        return self.master_addr, self.master_port

    def setup(self) -> None:
        """Join the process group, load the model and build the DeepSpeed engine (all ranks together)."""
        import deepspeed

        s = self.settings
        cuda = torch.cuda.is_available()
        os.environ.update({
            "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port), "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": "0",  # Ray gives each GPU actor its own device 0
        })
        if self.world_size == 1 and not cuda:
            skip_shared_memory_op()
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
        random.seed(s.seed)
        np.random.seed(s.seed)
        torch.manual_seed(s.seed)  # identical new heads (critic / reward) on every rank
        bf16, weights_dtype = training_precision(s.dtype, s.bf16)  # AdamW steps float32 weights or masters
        config = deepspeed_config(s, self.world_size, bf16)
        hf = self._build_model(weights_dtype, config)
        if s.lora is not None:
            from rayrlhf.models.lora import apply_lora

            # The HF model keeps its class and names with the LoRA layers inside it; the wrapper (held outside
            # the module tree) switches the adapter off for the reference and names the adapter's files.
            self.peft = apply_lora(hf, s.lora, self.role, self.model_path)
            hf = self.peft.get_base_model()
        if s.gradient_checkpointing:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hf.config.use_cache = False
        module = RoleModule(self.role, hf)
        # a ZeRO-3 partitioned parameter is a flat shard: its own shape is `ds_shape`
        decay = [p for p in module.parameters() if p.requires_grad and len(getattr(p, "ds_shape", p.shape)) >= 2]
        no_decay = [p for p in module.parameters() if p.requires_grad and len(getattr(p, "ds_shape", p.shape)) < 2]
        groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # fused: one kernel over all parameters (torch's default on CPU loops tensor by tensor)
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=s.lr, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(s))
        self.engine, *_ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False,
        )
        self.device = self.engine.device
        trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
        log.info("%s rank %d/%d ready: ZeRO-%d, bf16=%s, %s%s", self.role, self.rank, self.world_size, s.zero_stage,
                 bf16, self.device, f", LoRA rank {s.lora.rank} ({trained} trained parameters)" if s.lora else "")

    def _build_model(self, weights_dtype: str, ds_config: dict[str, Any]) -> Any:
        """The role's model: under ZeRO-3 created partitioned over the group and streamed in module by module
        (`models.partitioned`: a rank's host memory falls with the group size), else loaded whole on each rank."""
        s = self.settings
        self.built_partitioned = False
        if s.zero_stage == 3 and s.partitioned_init and s.lora is None:  # LoRA: whole (frozen base; adapter added after)
            from rayrlhf.models.partitioned import NotPartitionable, load_partitioned

            try:
                model = load_partitioned(self.role, self.model_path, weights_dtype, s.trust_remote_code,
                                         s.disable_dropout, ds_config)
                self.built_partitioned = True
                return model
            except NotPartitionable as exc:  # raised by every rank alike: all load whole instead
                log.warning("%s: loading the whole model on each rank (%s)", self.role, exc)
        return _LOADERS[self.role](self.model_path, weights_dtype, s.trust_remote_code, s.disable_dropout)

    # ---------------------------------------------------------------- forward-only passes

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device) for k, v in batch.items()}

    def _forward(
        self, batch: Batch, with_entropy: bool = False, temperature: float = 1.0, adapter: bool = True
    ) -> dict[str, torch.Tensor]:
        """The role's outputs on this shard, micro-batch by micro-batch, in eval mode without grad (with a LoRA
        adapter switched off unless `adapter`: the base model, which is the reference policy)."""
        self.engine.eval()
        packed = sub_batch(batch, "")
        s = self.settings
        n_micro = num_micro_batches(packed, s.micro_batch_size, s.micro_batch_tokens)
        outs: list[dict[str, torch.Tensor]] = []
        width = packed["mask"].shape[1]
        off = self.peft.disable_adapter() if self.peft is not None and not adapter else nullcontext()
        with torch.no_grad(), off:
            for mb in map(trim_padding, split_rows(packed, n_micro, lambda k: True)):
                out = self.engine(**self._to_device(mb), with_entropy=with_entropy, temperature=temperature)
                # back to the shard's width (the trimmed micro-batch may hold fewer response columns)
                outs.append({k: F.pad(v, (0, width - v.shape[1])) if v.dim() == 2 else v for k, v in out.items()})
        return {k: torch.cat([o[k] for o in outs]).float().cpu() for k in outs[0]}

    def forward_logprobs(
        self, batch: Batch, with_entropy: bool = False, temperature: float | None = None, adapter: bool = True
    ) -> dict[str, torch.Tensor]:
        """Per-token log-probs [b, T] (and entropy) of this rank's rows; temperature defaults to the sampling one.
        `adapter=False`: those of the base model, a LoRA adapter switched off (the reference policy)."""
        self._expect_role("policy", "forward_logprobs")
        if not adapter and self.peft is None:
            raise ValueError("forward_logprobs(adapter=False) needs a LoRA policy (model.lora); this one trains the whole model")
        return self._forward(batch, with_entropy, self.settings.temperature if temperature is None else temperature, adapter)

    def forward_values(self, batch: Batch) -> torch.Tensor:
        self._expect_role("critic", "forward_values")
        return self._forward(batch)["values"]

    def forward_scores(self, batch: Batch) -> torch.Tensor:
        self._expect_role("reward", "forward_scores")
        return self._forward(batch)["scores"]

    def _expect_role(self, role: str, what: str) -> None:
        if self.role != role:
            raise ValueError(f"{what} needs a {role} trainer, this group trains the {self.role}")

    # ---------------------------------------------------------------- training

    def _all_reduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def train_step(self, batch: Batch, loss: str, loss_args: dict[str, Any] | None = None) -> dict[str, float]:
        """One optimizer step on this rank's shard of a mini-batch; returns metrics averaged over all ranks."""
        args = dict(loss_args or {})
        if LOSS_ROLES.get(loss) not in (None, self.role):
            raise ValueError(f"loss {loss!r} trains a {LOSS_ROLES[loss]}, this group trains the {self.role}")
        if loss == "ppo":  # PPO's ratios must use the sampling temperature; SFT/DPO/ptx/values use the model as is
            args.setdefault("temperature", self.settings.temperature)
        validate(loss, batch, args)
        batch = self._to_device(batch)
        units = count_units(loss, batch, args)
        keys = sorted(units)
        totals = dict(zip(keys, self._all_reduce([units[k] for k in keys]), strict=True))
        passes = plan_passes(loss, batch, args, self.settings.micro_batch_size, self.settings.micro_batch_tokens)
        engine = self.engine
        engine.train()

        def forward(packed: Batch, with_entropy: bool, temperature: float) -> dict[str, torch.Tensor]:
            return engine(**packed, with_entropy=with_entropy, temperature=temperature)

        stats: dict[str, float] = {}
        for i, run_pass in enumerate(passes):
            engine.set_gradient_accumulation_boundary(i == len(passes) - 1)
            result = run_pass(forward, totals)
            # ZeRO averages gradients over ranks: scale by the world size so they sum instead.
            engine.backward(result.loss * self.world_size, scale_wrt_gas=False)
            for k, v in result.stats.items():
                stats[k] = stats.get(k, 0.0) + v
        lr = float(engine.get_lr()[0])
        own_norm = self._grad_norm() if engine.zero_optimization_stage() == 0 else None
        engine.step()
        names = sorted(stats)
        metrics = dict(zip(names, self._all_reduce([stats[k] for k in names]), strict=True))
        norm = engine.get_global_grad_norm()
        metrics["grad_norm"] = float(norm if norm is not None else (own_norm or 0.0))
        metrics["lr"] = lr
        return metrics

    def _grad_norm(self) -> float:
        """Gradient norm for ZeRO-0, where DeepSpeed does not report one (grads are already all-reduced)."""
        sq = sum(float(p.grad.float().pow(2).sum()) for p in self.engine.module.parameters() if p.grad is not None)
        return math.sqrt(sq)

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self, directory: str, tag: str) -> None:
        """Model, optimizer, LR scheduler (DeepSpeed's files) plus this rank's RNG states. With a LoRA adapter only
        the adapter and its optimizer state are saved: the frozen base comes back from the model's own files."""
        self.engine.save_checkpoint(directory, tag=tag, client_state={"settings": asdict(self.settings)},
                                    exclude_frozen_parameters=self.peft is not None)
        rng = rng_state()  # tensors and plain values only: it loads back with weights_only=True
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        (Path(directory) / tag).mkdir(parents=True, exist_ok=True)
        torch.save(rng, Path(directory) / tag / f"rng_rank{self.rank}.pt")
        torch.distributed.barrier()

    def load_checkpoint(self, directory: str, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(
            directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True,
            load_module_strict=self.peft is None,  # a LoRA checkpoint holds the adapter only
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} under {directory}")
        rng_file = Path(directory) / tag / f"rng_rank{self.rank}.pt"
        if rng_file.exists():
            rng = torch.load(rng_file, weights_only=True)
            set_rng_state(rng)
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        torch.distributed.barrier()

    def shutdown(self) -> None:
        """Leave the weight group and the process group cleanly (a rank that exits inside it aborts with SIGABRT)."""
        self.destroy_weight_group()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        self.engine = None

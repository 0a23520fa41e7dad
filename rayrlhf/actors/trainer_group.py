"""Driver-side handle of one trainer group: R `TrainerRank` actors forming one DeepSpeed world.

The group owns the placement group and the actors, splits every full batch contiguously over
the ranks (rank r gets rows [r*B/R, (r+1)*B/R)), calls all ranks together (each collective needs
all of them) and merges the answers. A failing rank surfaces at once (the group waits with
`ray.wait`, not rank by rank); the other ranks may then be stuck in a collective, so a group
that raised from a rank should be shut down.

Weight streaming protocol::

    gen = group.iter_weight_buckets(bucket_bytes, dtype)   # rank 0's ObjectRefGenerator
    for ref in gen:                                         # each ref holds one Bucket
        ...                                                 # pass refs on, or ray.get(ref)
    group.finish_weight_stream()                            # joins the other ranks, raises their errors

Every rank runs the streaming method (ZeRO-3 gathers need them all); only rank 0 yields.
Streaming generators run ahead of the consumer, so no rank waits on the caller's pace; the next
group call also finishes a stream left open.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayrlhf.actors.losses_step import LOSS_ROLES, validate
from rayrlhf.actors.trainer import ROLES, TrainerRank, TrainerSettings
from rayrlhf.actors.weights import DEFAULT_BUCKET_BYTES, Region
from rayrlhf.config import JobConfig, RoleConfig
from rayrlhf.errors import TrainerFailed
from rayrlhf.models.lora import lora_spec

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


def role_config(cfg: JobConfig, role: str) -> RoleConfig:
    """The trainer section of a role: the critic has its own; the policy's also serves offline RM training."""
    return cfg.trainer.critic if role == "critic" else cfg.trainer.policy


def trainer_settings(cfg: JobConfig, role: str, total_steps: int) -> TrainerSettings:
    """Settings of one role's ranks; `total_steps` counts optimizer steps (for the LR schedule)."""
    if role not in ROLES:
        raise ValueError(f"unknown trainer role {role!r}; valid roles are {list(ROLES)}")
    rc, t = role_config(cfg, role), cfg.trainer
    mini = t.mini_batch_size or cfg.samples_per_step
    per_rank = max(1, mini // rc.num_ranks)
    return TrainerSettings(
        zero_stage=t.stage_for(rc.num_ranks),
        micro_batch_size=t.micro_batch_size,
        micro_batch_tokens=t.micro_batch_tokens,
        gradient_accumulation_steps=max(1, math.ceil(per_rank / (t.micro_batch_size or per_rank))),
        lr=rc.lr,
        weight_decay=rc.weight_decay,
        warmup_steps=rc.warmup_steps,
        lr_schedule=rc.lr_schedule,
        total_steps=max(1, total_steps),
        max_grad_norm=t.max_grad_norm,
        bf16=t.bf16,
        gradient_checkpointing=t.gradient_checkpointing,
        offload=t.offload,
        partitioned_init=t.partitioned_init,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        seed=cfg.seed,
        temperature=cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0,
        disable_dropout=cfg.model.disable_dropout,
        num_threads=rc.num_threads,
        cpus=rc.cpus,
        lora=lora_spec(cfg.model.lora) if role != "critic" else None,  # the critic trains whole
    )


def rank_bundle(num_cpus: float, num_gpus: float, resources: dict[str, float] | None = None) -> dict[str, float]:
    """What one rank's placement-group bundle reserves."""
    return {k: v for k, v in {"CPU": num_cpus, "GPU": num_gpus, **(resources or {})}.items() if v > 0} or {"CPU": 0.01}


def place_bundles(what: str, bundles: list[dict[str, float]], strategy: str, timeout_s: float) -> Any:
    """A ready placement group of `bundles`, or RuntimeError saying what did not fit."""
    pg = placement_group([dict(b) for b in bundles], strategy=strategy.upper())
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise RuntimeError(
            f"{what} could not be placed within {timeout_s:.0f}s: it asks for bundles {bundles}; the cluster has "
            f"{ray.cluster_resources()} in total and {ray.available_resources()} free"
        ) from None
    return pg


class TrainerGroup:
    """R ranks of one role (policy, critic or reward model) behind full-batch methods."""

    def __init__(
        self,
        role: str,
        model_path: str,
        settings: TrainerSettings,
        num_ranks: int = 1,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        name_prefix: str | None = None,
        placement_timeout_s: float = 120.0,
        placement: str = "pack",
        resources: dict[str, float] | None = None,
        shared_pg: Any = None,
    ) -> None:
        """`shared_pg`: a placement group the caller made and keeps (servers.colocate: one bundle per rank, with
        room for the servers beside it); the ranks take bundle `rank` of it and leave it in place at shutdown."""
        if role not in ROLES:
            raise ValueError(f"unknown trainer role {role!r}; valid roles are {list(ROLES)}")
        self.role, self.num_ranks, self.settings = role, num_ranks, settings
        self.timeout_s: float | None = None  # set by watch(); None: calls wait as long as they take
        self.broken: str | None = None  # why a rank failed; every later call raises TrainerFailed at once
        self.heartbeat_s, self.on_hang, self.idents = 60.0, None, []
        self._stream_rest: list[Any] = []
        self._weight_group_key: tuple[str, ...] | None = None  # the workers the current weight group spans
        self._weight_group_count = 0
        self._layouts: dict[str, Any] = {}
        self._owns_pg = shared_pg is None
        if shared_pg is not None:
            self.pg = shared_pg
        else:
            bundle = rank_bundle(num_cpus, num_gpus, resources)
            self.pg = place_bundles(f"the {role} trainer group", [bundle] * num_ranks, placement, placement_timeout_s)
        prefix = name_prefix or role

        def make(rank: int, addr: str | None, port: int | None) -> Any:
            return TrainerRank.options(
                name=f"{prefix}-{rank}", num_cpus=num_cpus, num_gpus=num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
            ).remote(role, str(model_path), rank, num_ranks, addr, port, settings)

        self.actors: list[Any] = []
        try:
            self.actors.append(make(0, None, None))
            addr, port = ray.get(self.actors[0].master_address.remote())
            self.actors += [make(r, addr, port) for r in range(1, num_ranks)]
            self._call("setup")
        except BaseException:
            self.shutdown(timeout_s=5.0)
            raise
        log.info("%s trainer group ready: %d rank(s), rendezvous %s:%d", role, num_ranks, addr, port)

    @classmethod
    def from_config(cls, cfg: JobConfig, role: str, model_path: str, total_steps: int, **kwargs: Any) -> TrainerGroup:
        """The group `cfg` describes for `role`; `kwargs` override (e.g. a colocated rank's smaller GPU share)."""
        rc = role_config(cfg, role)
        options: dict[str, Any] = {"num_ranks": rc.num_ranks, "num_cpus": rc.num_cpus, "num_gpus": rc.num_gpus,
                                   "placement": rc.placement, "resources": rc.resources, **kwargs}
        return cls(role, model_path, trainer_settings(cfg, role, total_steps), **options)

    # ---------------------------------------------------------------- plumbing

    def watch(self, timeout_s: float | None, heartbeat_s: float, on_hang: Callable[[str, list[int]], None] | None = None) -> None:
        """Bound every call: a rank that has not answered after `timeout_s` is hung (`on_hang(role, ranks)`
        dumps its stacks), and the call raises TrainerFailed; a log line every `heartbeat_s` while it waits."""
        self.timeout_s, self.heartbeat_s, self.on_hang = timeout_s, heartbeat_s, on_hang
        self.idents = ray.get([a.identity.remote() for a in self.actors])

    def _wait(self, refs: list[Any], what: str = "call") -> list[Any]:
        """Results of all ranks; the first rank error is raised at once instead of behind a hung peer.

        A rank that died, did not answer within the watch timeout, or failed in a collective because a peer
        went away raises TrainerFailed, and the group is broken from then on: every later call raises at
        once (without waiting or dumping again) until the loop rebuilds the groups. A rank's own error (a bad
        batch, a bug) is raised as it is."""
        from rayrlhf.actors.health import COMM, DIED, UNAVAILABLE, classify

        if self.broken:
            raise TrainerFailed(f"{self.role} trainer: {self.broken} (the groups are being rebuilt)")
        pending, start = list(refs), time.monotonic()
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=self.heartbeat_s if self.timeout_s else None)
            if not done:
                waited = time.monotonic() - start
                ranks = [refs.index(r) for r in pending if refs.index(r) < self.num_ranks]
                if waited >= self.timeout_s:
                    self.broken = f"rank(s) {ranks} gave no answer to {what} within {self.timeout_s:.0f}s (faults.train_timeout_s): hung"
                    if self.on_hang is not None:
                        self.on_hang(self.role, ranks)
                    raise TrainerFailed(f"{self.role} trainer: {self.broken}")
                log.warning("still waiting on the %s trainer's %s after %.0f s (rank(s) %s)", self.role, what, waited, ranks)
                continue
            try:
                ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 - sorted below
                kind = classify(exc)
                if kind in (DIED, UNAVAILABLE):
                    self.broken = f"rank {refs.index(done[0])} died during {what}: {type(exc).__name__}"
                elif kind == COMM or self._any_rank_dead():
                    self.broken = f"a collective failed during {what} (a peer rank went away): {str(exc)[:300]}"
                else:
                    raise
                raise TrainerFailed(f"{self.role} trainer: {self.broken}") from exc
        return ray.get(refs)

    def _any_rank_dead(self, timeout_s: float = 10.0) -> bool:
        """Whether a rank is dead or does not answer a trivial call (a surviving rank's error may be the echo)."""
        refs = [a.identity.remote() for a in self.actors]
        done, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if pending:
            return True
        try:
            ray.get(done)
        except ray.exceptions.RayActorError:
            return True
        return False

    def _call(self, method: str, *args: Any, per_rank: list[tuple[Any, ...]] | None = None) -> list[Any]:
        self.finish_weight_stream()
        calls = per_rank or [args] * self.num_ranks
        return self._wait([getattr(a, method).remote(*c) for a, c in zip(self.actors, calls, strict=True)], method)

    def _split(self, batch: Batch) -> list[Batch]:
        """Contiguous equal row shards per rank; every tensor's rows must divide by the rank count."""
        shards: list[Batch] = [{} for _ in range(self.num_ranks)]
        for key, value in batch.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{self.role} trainer: batch[{key!r}] must be a tensor, got {type(value).__name__}")
            rows = int(value.shape[0]) if value.dim() else 0
            if rows == 0 or rows % self.num_ranks:
                raise ValueError(
                    f"{self.role} trainer: batch[{key!r}] has {rows} rows, which do not split evenly over "
                    f"{self.num_ranks} rank(s); make the (mini-)batch a multiple of the rank count"
                )
            for r, part in enumerate(value.split(rows // self.num_ranks)):
                shards[r][key] = part.clone()  # a view would ship its whole parent storage to every rank
        return shards

    # ---------------------------------------------------------------- forward passes

    def _even(self, batch: Batch) -> tuple[Batch, int]:
        """`batch` with its last row repeated until the rows split evenly over the ranks, and the real row count."""
        rows = int(batch["input_ids"].shape[0])
        extra = -rows % self.num_ranks
        if extra:
            batch = {k: torch.cat([v, v[-1:].expand(extra, *v.shape[1:])]) for k, v in batch.items()}
        return batch, rows

    def forward_logprobs(
        self, batch: Batch, with_entropy: bool = False, temperature: float | None = None, adapter: bool = True
    ) -> dict[str, torch.Tensor]:
        """Per-token log-probs [B, T] (and entropy [B, T] when asked) of the policy, for any number of rows.

        `temperature` defaults to the sampling temperature the group was configured with. `adapter=False` (a LoRA
        policy only): the base model's, the adapter switched off, which is the reference policy.
        """
        batch, rows = self._even(batch)
        outs = self._call("forward_logprobs",
                          per_rank=[(s, with_entropy, temperature, adapter) for s in self._split(batch)])
        return {k: torch.cat([o[k] for o in outs])[:rows] for k in outs[0]}

    def forward_values(self, batch: Batch) -> torch.Tensor:
        """Critic values [B, T]."""
        batch, rows = self._even(batch)
        return torch.cat(self._call("forward_values", per_rank=[(s,) for s in self._split(batch)]))[:rows]

    def forward_scores(self, batch: Batch) -> torch.Tensor:
        """Reward-model scores [B]."""
        batch, rows = self._even(batch)
        return torch.cat(self._call("forward_scores", per_rank=[(s,) for s in self._split(batch)]))[:rows]

    # ---------------------------------------------------------------- training and state

    def train_step(self, batch: Batch, loss: str, loss_args: dict[str, Any] | None = None) -> dict[str, float]:
        """One optimizer step on a global mini-batch; the metrics are already reduced over the ranks.

        Batches are `pack_batch` layouts (input_ids, attention_mask, position_ids [B, P+T], mask [B, T])
        plus, per loss:
          * ``ppo``: advantages [B, T] or [B]; old_logp [B, T] (without it, the detached log-probs of the
            update's own forward: exact for a step that makes one update); ref_logp with ``kl_coef`` > 0 (KL as a
            loss term, GRPO); a ``ptx_``-prefixed packed sub-batch with ``ptx_coef`` > 0 (PPO-ptx).
            loss_args: clip_eps, clip_eps_high, kl_coef, kl_estimator, ptx_coef, agg, temperature,
            is_cap, policy_loss (ppo, gspo, gspo_token).
          * ``value``: old_values, returns [B, T]; loss_args: value_clip_eps, agg.
          * ``sft``: only the packed batch; loss_args: agg.
          * ``bt`` (reward) / ``dpo`` (policy): ``chosen_`` and ``rejected_`` packed sub-batches
            (no unprefixed ones); dpo also ref_chosen_logp / ref_rejected_logp [B]; loss_args: beta,
            label_smoothing.
        The result is exactly one step on the loss of the whole mini-batch, whatever the rank and
        micro-batch split. Metrics: loss, grad_norm (before clipping), lr (of this update) and the
        loss's own (clipfrac, approx_kl, entropy, kl, ptx_loss; vf_clipfrac; accuracy, margin).
        """
        args = dict(loss_args or {})
        if LOSS_ROLES.get(loss, self.role) != self.role:
            raise ValueError(f"loss {loss!r} trains a {LOSS_ROLES[loss]}, but this group trains the {self.role}")
        validate(loss, batch, args)  # here, so bad input fails fast with one clear error
        return self._call("train_step", per_rank=[(s, loss, args) for s in self._split(batch)])[0]

    def save_checkpoint(self, directory: str, tag: str) -> None:
        self._call("save_checkpoint", str(directory), tag)

    def load_checkpoint(self, directory: str, tag: str) -> None:
        self._call("load_checkpoint", str(directory), tag)

    def export_hf(self, directory: str, dtype: str | None = None, merged: bool | None = None) -> None:
        """A Hugging Face directory (config, safetensors, tokenizer) of the current weights; with a LoRA adapter,
        the adapter in peft's format (adapter_config.json, adapter_model.safetensors), or merged when asked."""
        self._call("export_hf", str(directory), dtype, merged)

    @property
    def lora(self) -> Any:
        """The group's LoraSpec (model.lora), or None when it trains the whole model."""
        return self.settings.lora

    @property
    def syncs_adapter(self) -> bool:
        """Whether a weight sync sends the LoRA adapter only (else the full weights, an adapter merged in)."""
        return self.role == "policy" and self.lora is not None and self.lora.sync == "adapter"

    def checksums(self, dtype: str | None = None, keys: list[tuple[str, Region]] | None = None) -> dict[tuple[str, Region], str]:
        """{(name, region): checksum} of what a sync sends (as rank 0 sees it): the pieces in `keys`, or every
        whole tensor and tied alias when None. That is the full weights in checkpoint names, or the LoRA adapter
        as an engine holds it when the sync sends the adapter."""
        return self._call("checksums", dtype, keys)[0]

    def weight_layout(self, dtype: str | None = None) -> tuple[list[tuple[str, tuple[int, ...], torch.dtype]], dict[str, str]]:
        """([(checkpoint name, shape, dtype)] in stream order, {tied alias: name}); fixed for a group, so cached."""
        key = str(dtype)
        if key not in self._layouts:
            self._layouts[key] = ray.get(self.actors[0].weight_layout.remote(dtype))
        return self._layouts[key]

    def iter_weight_buckets(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype: str | None = None,
                            end_marker: bool = False) -> Any:
        """Start a weight stream on every rank and return rank 0's ObjectRefGenerator of buckets (and a final
        None when `end_marker`: a stream that breaks ends with an error in its place)."""
        self.finish_weight_stream()
        gens = [a.iter_weight_buckets.options(num_returns="streaming").remote(bucket_bytes, dtype, end_marker)
                for a in self.actors]
        self._stream_rest = gens[1:]
        return gens[0]

    def stream_weight_buckets(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype: str | None = None) -> Any:
        """Rank 0's bucket refs, each handed out only once the trainer side is known to be healthy up to it.

        Every wait is bounded by the watch timeout. A stream that breaks (a rank raised or died) ends with an
        error in place of its next item, so a bucket is yielded only once the item after it has arrived, and
        the last item (the end marker, or the error) is read here: never by a rollout worker, which would be
        blamed for the trainer's failure. Only that tiny last item is fetched to the driver."""
        gen = self.iter_weight_buckets(bucket_bytes, dtype, end_marker=True)
        held = None
        while True:
            self._await_next(gen, "the weight stream")
            try:
                ref = next(gen)
            except StopIteration:
                break
            if held is not None:
                yield held
            held = ref
        if held is None:
            raise TrainerFailed(f"{self.role} trainer: the weight stream ended without any item")
        self._wait([held], "the weight stream")  # the error that broke the stream, if any, raised as a trainer fault
        if ray.get(held) is not None:
            raise TrainerFailed(f"{self.role} trainer: the weight stream ended without its end marker")
        self.finish_weight_stream()

    def _await_next(self, gen: Any, what: str) -> None:
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        while True:
            ready, _ = ray.wait([gen], timeout=self.heartbeat_s)
            if ready:
                return
            if deadline is not None and time.monotonic() >= deadline:
                self.broken = f"rank 0 gave no weight bucket within {self.timeout_s:.0f}s (faults.train_timeout_s): hung"
                if self.on_hang is not None:
                    self.on_hang(self.role, [0])
                raise TrainerFailed(f"{self.role} trainer: {self.broken}")
            log.warning("still waiting on the %s trainer's %s", self.role, what)

    def finish_weight_stream(self) -> None:
        """Wait (bounded) for the non-zero ranks of the last weight stream (they yield nothing) and raise their errors."""
        rest, self._stream_rest = self._stream_rest, []
        for gen in rest:
            while True:
                self._await_next(gen, "the end of the weight stream")
                try:
                    ref = next(gen)
                except StopIteration:
                    break
                self._wait([ref], "the weight stream")

    # ---------------------------------------------------------------- collective weight sync

    def reset_weight_group(self) -> None:
        """Form the broadcast group anew at the next collective sync (a restarted worker keeps its actor id)."""
        self._weight_group_key = None

    def setup_weight_group(self, workers: list[Any], timeout_s: float = 300.0) -> dict[int, tuple[str, str]]:
        """Form the broadcast group {rank 0, workers} once; a different worker list forms a new one.

        Returns the workers that did not join in time or failed to ({} when the group is formed); the
        group is then not formed (the caller leaves them out and forms one without them)."""
        from rayrlhf.actors.weight_sync import settle

        key = tuple(w._actor_id.hex() for w in workers)
        if self._weight_group_key == key:
            return {}
        self.finish_weight_stream()
        self._weight_group_key = None
        addr, port = self._wait([self.actors[0].weight_group_address.remote()], "weight_group_address")[0]
        self._weight_group_count += 1
        name = f"{self.actors[0]._actor_id.hex()[:12]}-{self._weight_group_count}"
        world = 1 + len(workers)
        trainer = [a.init_weight_group.remote(addr, port, world, name, timeout_s) for a in self.actors]
        joins = {i: [w.init_weight_group.remote(addr, port, world, i + 1, name, None, timeout_s)] for i, w in enumerate(workers)}
        failed = settle(joins, time.monotonic() + timeout_s)
        if failed:  # rank 0 gives up on the group at its own timeout (timeout_s)
            return failed
        self._wait(trainer, "init_weight_group")
        self._weight_group_key = key
        log.info("weight group %s: policy rank 0 + %d worker(s) via %s:%d", name, len(workers), addr, port)
        return {}

    def broadcast_weights_collective(
        self, workers: list[Any], version: int, dtype: str | None = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        timeout_s: float = 600.0,
    ) -> Any:
        """Push the full weights to `workers` over the broadcast group and set their `weight_version`.

        Returns a `weight_sync.SyncResult`. A worker that fails (to join, to receive, in time) is blamed, and the
        others of this attempt are not synced (the group broke for everyone: the caller tries again without
        the failed ones, over a new group); a gloo/NCCL error on rank 0 caused by such a worker is its echo,
        not a trainer fault. A trainer rank that died or hung raises TrainerFailed.
        """
        from rayrlhf.actors.health import COMM, DIED, UNAVAILABLE, classify
        from rayrlhf.actors.weight_sync import SyncResult, settle

        result = SyncResult()
        result.failed = self.setup_weight_group(workers, timeout_s)
        if result.failed:
            return result
        meta, aliases = self.weight_layout(dtype)
        result.failed = settle({i: [w.begin_weight_update.remote(aliases)] for i, w in enumerate(workers)},
                               time.monotonic() + timeout_s)
        if result.failed:  # a member will not receive: the broadcast would wait for it
            self._weight_group_key = None
            return result
        deadline = time.monotonic() + timeout_s
        recvs = {i: [w.receive_weights.remote(meta, bucket_bytes)] for i, w in enumerate(workers)}
        sends = [a.broadcast_weights.remote(dtype) for a in self.actors]
        result.failed = settle(recvs, deadline)
        done, pending = ray.wait(sends, num_returns=len(sends), timeout=max(0.0, deadline - time.monotonic()))
        errors = []
        for ref in done:
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - sorted below
                errors.append(exc)
        if any(classify(e) in (DIED, UNAVAILABLE) for e in errors):
            self._weight_group_key = None
            self._wait(sends, "broadcast_weights")  # raises TrainerFailed (a rank died)
        if result.failed:
            self._weight_group_key = None
            return result
        if pending or errors:
            self._weight_group_key = None
            if errors and all(classify(e) != COMM for e in errors):
                raise errors[0]
            self._wait(sends, "broadcast_weights")  # a hung rank: TrainerFailed after the watch timeout
            raise TrainerFailed(f"{self.role} trainer: the collective weight broadcast failed: {errors[0]!r}"[:500])
        sent = ray.get(sends[0])
        if [(n, tuple(s)) for n, s, _ in sent] != [(n, tuple(s)) for n, s, _ in meta]:
            self._weight_group_key = None
            raise RuntimeError(f"{self.role} rank 0 broadcast other tensors than its metadata announced")
        result.moved = len(sent)
        result.failed = settle({i: [w.finish_weight_update.remote(version)] for i, w in enumerate(workers)},
                               time.monotonic() + timeout_s)
        result.synced = [i for i in range(len(workers)) if i not in result.failed]
        return result

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Leave the process group on every rank, then kill the actors and free the placement group."""
        self._stream_rest = []
        self._weight_group_key = None  # the ranks leave it in their shutdown
        if self.actors:
            refs = [a.shutdown.remote() for a in self.actors]
            done, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            if pending:
                log.warning("%s trainer: %d rank(s) did not leave the process group in %.0fs; killing them",
                            self.role, len(pending), timeout_s)
            for actor in self.actors:
                ray.kill(actor)
            self.actors = []
        if self.pg is not None and self._owns_pg:
            remove_placement_group(self.pg)
        self.pg = None

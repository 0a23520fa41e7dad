"""The actors of one online RL job, created from config, and the three things the loop asks of
them: score a micro-batch, sync the weights, save or load the trainers."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray
import torch

from rayrlhf.actors.reward_server import RemoteRewardServer
from rayrlhf.actors.rollout import create_rollout_workers
from rayrlhf.actors.scorers import RemoteReferenceServer
from rayrlhf.actors.trainer_group import TrainerGroup, place_bundles, rank_bundle
from rayrlhf.actors.types import Completion
from rayrlhf.actors.weight_sync import (
    SyncResult,
    broadcast_weights,
    engine_dtype,
    push_buckets,
    verify_weights,
)
from rayrlhf.actors.weights import bucket_checksums
from rayrlhf.config import JobConfig
from rayrlhf.errors import WorkersLost
from rayrlhf.models.forward import pack_batch
from rayrlhf.orchestrator.faults import FaultCounters, FaultPolicy, Restartable, ServerCaller
from rayrlhf.orchestrator.lora_sync import probe_atol, probe_ids, verify_adapter_logprobs
from rayrlhf.orchestrator.plan import ActorSpec, colocated_rank_gpus, lora_reference
from rayrlhf.orchestrator.preflight import Checked
from rayrlhf.orchestrator.workers import WorkerPool


def sampling_distorts(cfg: JobConfig) -> bool:
    """Whether the engines' log-probs are of a processed distribution (min_new_tokens masks the end token,
    top-p/top-k renormalise over the kept tokens), not of the policy's log_softmax(logits / T).

    They are still the right behaviour density for importance weights (the samples were drawn from it),
    but not the policy π: the KL to the reference and the engine/trainer mismatch need the trainer's."""
    r = cfg.rollout
    return r.min_new_tokens > 0 or r.top_p < 1.0 or r.top_k > 0


def old_logprobs_mode(cfg: JobConfig) -> str:
    """`algorithm.old_logprobs` resolved: "current" (the update's own forward) when a step makes exactly
    one update per sample, since the old policy then is the current one; otherwise the configured way."""
    mode = cfg.algorithm.old_logprobs
    one_update = cfg.algorithm.ppo_epochs == 1 and (cfg.trainer.mini_batch_size or cfg.samples_per_step) >= cfg.samples_per_step
    if mode == "auto":
        # The KL as a reward is paid before the update, so π must be known then: a forward under the weights
        # being trained when the engine's log-probs are not π's (asynchronous: stale; processed sampling).
        kl_reward = cfg.algorithm.kl_as_reward and cfg.algorithm.needs_reference
        needs_pi = kl_reward and (cfg.schedule.max_staleness > 0 or sampling_distorts(cfg))
        return "current" if one_update and not needs_pi else "recompute"
    return mode

log = logging.getLogger(__name__)


def _wait_names_free(names: list[str], timeout_s: float = 15.0) -> None:
    """Wait until killed named actors are gone, so the next job in this namespace can reuse the names."""
    import time

    deadline = time.monotonic() + timeout_s
    for name in names:
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name)
            except ValueError:
                break
            time.sleep(0.1)


class System:
    """Rollout workers, policy (and critic) trainer groups, the reference and the reward servers."""

    def __init__(self, cfg: JobConfig, checked: Checked, faults: FaultCounters | None = None, trainers: bool = True) -> None:
        """`trainers` False starts only what evaluation needs (`rayrlhf eval`): the rollout workers, which load the
        policy from `checked.policy` and keep it, the reward servers and the environments; no reference, no trainers."""
        self.cfg, self.plan, self.checked = cfg, checked.plan, checked
        self.trains = trainers
        self.faults = faults or FaultCounters()
        self.fault_dir = Path(cfg.output_dir) / "faults"
        self.fault_policy = FaultPolicy(cfg.faults, self.fault_dir, self.faults, cfg.rollout.max_new_tokens)
        self.callers: dict[str, ServerCaller] = {}
        self.synced_version = 0  # the weight version the workers in service hold
        # Asynchronous mode: the buckets of the last sync stay in the object store, so a worker that restarts
        # mid-rollout gets the weights that rollout samples with although the trainers have moved on.
        self.retain_weights = cfg.faults.keep_synced_weights if cfg.faults.keep_synced_weights is not None else (
            cfg.schedule.max_staleness > 0 and cfg.servers.weight_sync_backend == "object_store")
        self._retained: tuple[int, dict[str, str], list[Any]] | None = None  # (version, aliases, bucket refs)
        self._rejoin_lock = threading.Lock()
        self._fn_restarts: dict[str, tuple[int, int]] = {}  # reward server -> (incarnation, restarts seen)
        self.policy_path = checked.policy
        self.tokenizer = checked.tokenizer
        # LoRA: the reference is the policy with its adapter off, computed by the policy group (no reference actor)
        self.reference_in_policy = lora_reference(cfg)
        self.recompute_old_logp = old_logprobs_mode(cfg) == "recompute"
        # Weights travel in the engines' dtype, as the engines resolved it on their nodes (`_start` asks them);
        # checksums compare the same bytes on both sides.
        self.sync_dtype: str | None = None
        self.optimizer_steps = steps = (
            cfg.schedule.steps * cfg.algorithm.ppo_epochs * (cfg.samples_per_step // (cfg.trainer.mini_batch_size or cfg.samples_per_step))
        )
        log.info("creating %d rollout worker(s) (%s)", cfg.rollout.num_workers, cfg.rollout.backend)
        self.policy = self.critic = self.reference = self.eval_reward = self.colocation = None
        self.rollout_workers, self.rewards, self.env_actors = [], [], []
        try:
            self._start(cfg, checked, steps)
        except BaseException:
            self.shutdown()  # nothing half-started is left behind, holding names or resources
            raise
        self._reward_turn = 0
        # Calls into one trainer group must reach all its ranks in the same order (collectives).
        self._policy_lock = threading.Lock()
        self._critic_lock = threading.Lock()
        self._ptx = None

    def _start(self, cfg: JobConfig, checked: Checked, steps: int) -> None:
        trust = cfg.model.trust_remote_code
        restarts = cfg.faults.max_restarts
        episodes = None
        if cfg.env.enabled:  # multi-turn: the workers run the episodes; environments beside them, or in env actors
            if cfg.env.num_workers:
                from rayrlhf.envs.actors import start_env_actors

                self.env_actors = start_env_actors(cfg.env, max_restarts=restarts)
            episodes = {"env": cfg.env, "model_path": self.policy_path, "apply_chat_template": cfg.data.apply_chat_template,
                        "trust_remote_code": trust}
        self.rollout_workers = create_rollout_workers(
            self.policy_path, cfg.rollout, cfg.model, cfg.seed, max_prompt_tokens=cfg.data.max_prompt_tokens,
            wait=False, max_restarts=restarts,  # engines start while the trainers do
            max_model_len=cfg.max_total_tokens if cfg.env.enabled else None, episodes=episodes,
        )
        srv, no_dropout = cfg.servers, cfg.model.disable_dropout
        self.colocation = self._colocation_group() if self.trains else None
        # no KL computed (kl_coef 0, fixed controller): no reference server
        for ref in self.plan.of("reference") if self.trains else ():
            self.reference = RemoteReferenceServer.options(
                name=ref.name, num_cpus=ref.num_cpus, num_gpus=ref.num_gpus, max_restarts=restarts,
                scheduling_strategy=self._beside(ref),
            ).remote(checked.reference, cfg.model.dtype, trust, srv.micro_batch_size, cfg.rollout.temperature or 1.0,
                     no_dropout)
        self.rewards = [
            RemoteRewardServer.options(name=spec.name, num_cpus=spec.num_cpus, num_gpus=spec.num_gpus,
                                       max_restarts=restarts, scheduling_strategy=self._beside(spec)).remote(
                model_path=checked.reward_model, function=cfg.reward.function, url=cfg.reward.url, dtype=cfg.model.dtype,
                trust_remote_code=trust, timeout_s=cfg.reward.timeout_s, max_retries=cfg.reward.max_retries,
                micro_batch_size=srv.micro_batch_size, policy_tokenizer=self.policy_path,
                auth_token_env=cfg.reward.auth_token_env, no_dropout=no_dropout,
                functions=[f.model_dump() for f in cfg.reward.functions] if cfg.reward.functions else None,
            )
            for spec in self.plan.of("reward")
        ]
        self.eval_reward = None  # the held-out metric (reward.eval_function), if any: one more function server
        if cfg.reward.eval_function:
            self.eval_reward = RemoteRewardServer.options(name="eval-reward", num_cpus=0, max_restarts=restarts).remote(
                function=cfg.reward.eval_function, timeout_s=cfg.reward.timeout_s)
        # The servers and engines start in the background; the trainer groups start (and block) meanwhile.
        if self.trains:
            log.info("creating the policy trainer group (%d rank(s), ZeRO-%d)", cfg.trainer.policy.num_ranks,
                     cfg.trainer.stage_for(cfg.trainer.policy.num_ranks))
            self._start_trainers()
        ray.get([r.ready.remote() for r in self.servers])
        if self.colocation is not None:
            self._check_colocated()
        ray.get([w.ready.remote() for w in self.rollout_workers])
        self.sync_dtype = engine_dtype(self.rollout_workers, cfg.faults.sync_timeout_s)
        self.callers = {name: ServerCaller(Restartable(name, actor, self.fault_policy))
                        for name, actor in self._server_names().items()}
        self.pool = WorkerPool(self.rollout_workers, self.fault_policy)

    def _colocation_group(self) -> Any:
        """servers.colocate: one placement-group bundle per policy rank, with room for the servers beside it
        (`ActorSpec.beside`). The System keeps it: a trainer rebuild reuses it, and the servers in it live on."""
        guests = [a for a in self.plan.actors if a.beside]
        if not guests:
            return None
        rc = self.cfg.trainer.policy
        bundles = [rank_bundle(r.num_cpus + sum(g.num_cpus for g in guests if g.beside == r.name), rc.num_gpus, rc.resources)
                   for r in self.plan.of("policy")]
        log.info("servers.colocate: %s beside %s", ", ".join(g.name for g in guests), ", ".join(g.beside for g in guests))
        return place_bundles("the policy ranks and the servers beside them (servers.colocate)", bundles, rc.placement, 120.0)

    def _check_colocated(self) -> None:
        """Each server the plan puts beside a policy rank runs in the policy's placement group (asked of the server)."""
        want = self.colocation.id.hex()
        guests = {"reference": self.reference, **{s.name: a for s, a in zip(self.plan.of("reward"), self.rewards, strict=True)}}
        for spec in (a for a in self.plan.actors if a.beside):
            got = ray.get(guests[spec.name].__ray_call__.remote(lambda _: ray.get_runtime_context().get_placement_group_id()))
            if got != want:
                raise RuntimeError(f"servers.colocate: {spec.name} runs in placement group {got}, not the policy's {want}")
        log.info("servers.colocate: %s in the policy's placement group %s",
                 ", ".join(f"{a.name} beside {a.beside}" for a in self.plan.actors if a.beside), want)

    def _beside(self, spec: ActorSpec) -> Any:
        """Where a server is scheduled: its policy rank's bundle when colocated, else anywhere."""
        if spec.beside is None or self.colocation is None:
            return "DEFAULT"
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        rank = [r.name for r in self.plan.of("policy")].index(spec.beside)
        return PlacementGroupSchedulingStrategy(self.colocation, placement_group_bundle_index=rank)

    def _start_trainers(self) -> None:
        cfg, f = self.cfg, self.cfg.faults
        shared = {"shared_pg": self.colocation,
                  "num_gpus": colocated_rank_gpus(self.plan, cfg.trainer.policy.num_gpus)} if self.colocation else {}
        self.policy = TrainerGroup.from_config(cfg, "policy", self.policy_path, self.optimizer_steps, **shared)
        self.critic = TrainerGroup.from_config(cfg, "critic", self.checked.critic, self.optimizer_steps) if self.checked.critic else None
        for group in (self.policy, self.critic):
            if group is not None:
                group.watch(f.train_timeout_s, f.heartbeat_s, self._dump_trainer)

    def _dump_trainer(self, role: str, ranks: list[int]) -> None:
        group = self.policy if role == "policy" else self.critic
        for r in ranks:
            self.fault_policy.hung(f"{role}-{r}", tuple(group.idents[r]))

    def restart_trainers(self) -> None:
        """A rank died or hung: a ZeRO world cannot take a new member, so every trainer group starts again
        (from the initial weights; the caller loads a checkpoint) and the workers' weights are synced anew."""
        for group in (self.policy, self.critic):
            if group is not None:
                group.shutdown(timeout_s=5.0)  # a rank stuck in a collective with the dead one is killed
        self.policy = self.critic = None
        self._start_trainers()

    def _server_names(self) -> dict[str, Any]:
        named = {"reference": self.reference, "eval-reward": self.eval_reward}
        named.update({spec.name: actor for spec, actor in zip(self.plan.of("reward"), self.rewards, strict=True)})
        return {k: v for k, v in named.items() if v is not None}

    def _ask(self, name: str, make_call: Callable[[], Any]) -> Any:
        """A server call's answer; a server that died or hung is restarted and asked again (faults.max_restarts)."""
        return self.callers[name].call(make_call)

    # ------------------------------------------------------------------------------ scoring
    def score(
        self, completions: list[Completion], prompts_and_columns: tuple[list[str], dict[str, list]], trainer_side: bool = True,
    ) -> dict[str, Any]:
        """Everything the update needs about one micro-batch of finished samples.

        Reference log-probs, the reward and (ppo) values are requested at once and computed in
        parallel by different actors; the policy's own log-probs (old_logp) come from the
        policy trainer, which is otherwise idle during the rollout, when the step needs them
        (`algorithm.old_logprobs`: a step with one update uses its own forward instead).
        Without `trainer_side` (asynchronous mode: the trainers are busy, and the values and
        old log-probs must be those of the weights that will train) only the frozen servers score.
        """
        batch = self.pack(completions)

        def ask_reference() -> Any:
            return self.reference.logprobs.remote(batch)

        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="server") as calls:  # both servers at once
            ref_logp = calls.submit(self._ask, "reference", ask_reference) if self.reference is not None else None
            if self.reference_in_policy:
                ref_logp = calls.submit(self.reference_logprobs, batch)
            scores = calls.submit(self.score_reward, completions, prompts_and_columns, batch)
            out = self.trainer_outputs(batch) if trainer_side else {}
            return {"ref_logp": ref_logp.result() if ref_logp is not None else None, **scores.result(), **out}

    def pack(self, completions: list[Completion]) -> dict[str, torch.Tensor]:
        """The training layout of finished samples; an episode's loss mask keeps its environment's tokens out."""
        masks = [c.loss_mask for c in completions] if any(c.loss_mask is not None for c in completions) else None
        return pack_batch([c.prompt_ids for c in completions], [c.response_ids for c in completions],
                          self.tokenizer.pad_token_id, masks=masks)

    @property
    def policy_lock(self) -> threading.Lock:
        """Held for every call into the policy group (its ranks must see calls in one order): scoring threads ask
        it for old and (LoRA) reference log-probs while the loop trains and syncs it."""
        return self._policy_lock

    def reference_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Reference log-probs from the LoRA policy group with its adapter switched off (plan: no reference actor)."""
        with self._policy_lock:
            return self.policy.forward_logprobs(batch, adapter=False)["logp"]

    def trainer_outputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """The trainers' view of finished samples under their current weights: the policy's log-probs
        and entropy (when the step recomputes old log-probs) and the critic's values (ppo)."""
        policy_out: dict[str, torch.Tensor] = {}
        if self.recompute_old_logp:
            with self._policy_lock:
                policy_out = self.policy.forward_logprobs(batch, with_entropy=True)
        values = None
        if self.critic is not None:
            with self._critic_lock:
                values = self.critic.forward_values(batch)
        return {"logp": policy_out.get("logp"), "entropy": policy_out.get("entropy"), "values": values}

    def score_reward(
        self, completions: list[Completion], prompts_and_columns: tuple[list[str], dict[str, list]],
        batch: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, list[float | None]]:
        """The reward of finished samples (and the held-out metric, reward.eval_function), alone in evaluation.

        An episode's response is its whole transcript after the first prompt (every turn, as the model saw it),
        and its `transcript` column the turns as messages. Without a reward source (an environment's turn rewards
        alone) the scores are 0 here; the turn rewards are added to them later."""
        prompts, columns = prompts_and_columns
        responses = self.tokenizer.batch_decode([c.response_ids for c in completions], skip_special_tokens=True)
        if not self.rewards:
            out: dict[str, list[float | None]] = {"scores": [0.0] * len(completions)}
        else:
            batch = batch if batch is not None else self.pack(completions)
            turn = self._reward_turn % len(self.rewards)
            reward, reward_name = self.rewards[turn], self.plan.of("reward")[turn].name
            self._reward_turn += 1
            combined, parts = self._ask(reward_name, lambda: reward.score_parts.remote(
                prompts, responses, columns, batch if self.cfg.model.reward else None))
            out = {"scores": combined, **({"reward_parts": parts} if parts else {})}  # parts: reward.functions by name
        if self.eval_reward is not None:
            out["true_scores"] = self._ask("eval-reward", lambda: self.eval_reward.score.remote(prompts, responses, columns))
        return out

    @property
    def servers(self) -> list[Any]:
        """The frozen servers: reference (if any), reward servers, the evaluation reward (if any)."""
        return [a for a in (self.reference, *self.rewards, self.eval_reward) if a is not None]

    def reset_prefix_caches(self) -> None:
        """Drop cached prompt KV in every engine, e.g. after evaluation, so training steps see the same engines."""
        refs = [w.reset_prefix_cache.remote() for w in self.pool.in_service()]
        try:
            ray.get(refs, timeout=self.cfg.faults.sync_timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:  # the next rollout handles the worker
            log.warning("resetting the prefix caches failed on a worker (%r); the next rollout will find it", exc)

    # -------------------------------------------------------------------------- weight sync
    def sync_weights(self, version: int, verify: bool, only: list[int] | None = None) -> None:
        """Push the policy's weights as `version` into the workers in service and the restarted ones (which
        serve again once their weights are verified), or into workers `only`; optionally prove equality.

        A worker whose part fails or hangs (faults.sync_timeout_s) leaves service and the sync goes on without
        it; a trainer rank that fails raises TrainerFailed. When no worker is left, restarted ones are waited for
        (faults.restart_timeout_s), else WorkersLost."""
        pool, f = self.pool, self.cfg.faults
        with self._policy_lock:
            if only is None:
                pool.notice_replaced(min(10.0, f.sync_timeout_s))  # restarted unseen while idle: rejoin, verified
                joining = pool.back(0.0 if pool.live else f.restart_timeout_s)
                targets = sorted({*pool.live, *joining})
            else:
                joining = targets = list(only)
            while True:
                if not targets:
                    if only is not None:  # the worker that was rejoining failed again; it is restarting once more
                        return
                    joining = targets = pool.back(f.restart_timeout_s)
                    if not targets:
                        raise WorkersLost(f"no rollout worker is left to receive weight version {version} ({pool.describe()})")
                result = self._push(version, targets, verify or bool(joining), fresh_group=bool(joining))
                for k, (kind, why) in result.failed.items():
                    pool.fail(targets[k], f"during the weight sync: {why}", kind)
                for i in (targets[k] for k in result.synced):
                    if i in joining:
                        pool.rejoin(i)
                done = {targets[k] for k in [*result.synced, *result.failed]}
                targets = [i for i in targets if i not in done]  # not reached (a collective attempt broke): again
                joining = [i for i in joining if i in targets]
                if not targets and (result.synced or only is not None):
                    break
            self.synced_version = version

    def _push(self, version: int, targets: list[int], verify: bool, fresh_group: bool) -> SyncResult:
        """One sync attempt to `targets`; the workers that failed it (by position in `targets`) are in the result."""
        workers = [self.pool.workers[i] for i in targets]
        if fresh_group:
            self.policy.reset_weight_group()
        timeout = self.cfg.faults.sync_timeout_s
        result = broadcast_weights(self.policy, workers, version, self.cfg.servers.weight_sync_bucket_mb * 1024 * 1024,
                                   self.sync_dtype, self.cfg.servers.weight_sync_backend, timeout_s=timeout,
                                   retain=self.retain_weights)
        if self.retain_weights and result.buckets is not None:
            self._retained = (version, self.policy.weight_layout(self.sync_dtype)[1], result.buckets)
        if verify and result.synced:
            bad = verify_weights(self.policy, [workers[k] for k in result.synced], self.sync_dtype, timeout_s=timeout)
            for k in sorted(bad, reverse=True):
                result.failed[result.synced[k]] = bad[k]
            result.synced = [k for k in result.synced if k not in result.failed]
        if verify and result.synced and self.policy.syncs_adapter:  # what the engines compute with the adapter
            atol = probe_atol(self.cfg.model.lora.probe_atol, self.sync_dtype)
            ids = probe_ids(self.checked.train.prompt_ids[:16], min(64, self.cfg.data.max_prompt_tokens))
            bad = verify_adapter_logprobs(self.policy, [workers[k] for k in result.synced], ids,
                                          self.tokenizer.pad_token_id, atol, version, timeout)
            for k in sorted(bad, reverse=True):
                result.failed[result.synced[k]] = bad[k]
            result.synced = [k for k in result.synced if k not in result.failed]
        return result

    def rejoin_worker(self, i: int) -> None:
        """Mid-rollout: restarted worker i gets the weights the rollout samples with, verified, and serves again.

        On-policy the trainers still hold them (nothing trained since the last sync); in asynchronous mode
        the trainers have moved on, and the buckets kept from the last sync are loaded instead."""
        with self._rejoin_lock:
            if i in self.pool.live:
                return
            if not self.trains:  # evaluation only: the restarted worker loaded the policy it serves from its folder
                self.pool.rejoin(i)
                return
            if self.cfg.schedule.max_staleness == 0:
                self.sync_weights(self.synced_version, verify=True, only=[i])
                return
            if self._retained is None or self._retained[0] != self.synced_version:
                log.warning("%s is back; it rejoins at the next weight sync (no copy of weight version %d is kept: "
                            "faults.keep_synced_weights)", self.pool.names[i], self.synced_version)
                return
            version, aliases, buckets = self._retained
            worker, timeout = self.pool.workers[i], self.cfg.faults.sync_timeout_s
            failed = push_buckets(buckets, aliases, [worker], version, timeout)
            if not failed:
                failed = verify_weights(self.policy, [worker], self.sync_dtype, timeout, expected_of=lambda keys: bucket_checksums(
                    ray.get(buckets), self.policy.weight_layout(self.sync_dtype)[0], aliases, keys))
            if failed:
                kind, why = failed[0]
                self.pool.fail(i, f"while rejoining: {why}", kind)
                return
            self.pool.rejoin(i)

    def probe_mismatch(self, prompt_ids: list[int], response_ids: list[int]) -> dict[str, float]:
        """Engine against trainer on the same weights and tokens, just after a sync: the log-probs of one
        sequence (raw, temperature 1) from a worker in service and from the policy trainer. This is what
        `rollout/logprob_mismatch` means where the sampled tokens cannot show it (stale samples, processed
        sampling). Empty when no worker answers in time."""
        from rayrlhf.actors.types import GenerationRequest, SamplingSpec
        from rayrlhf.orchestrator.experience import logprob_mismatch
        from rayrlhf.orchestrator.workers import collect

        ids = list(prompt_ids) + list(response_ids)
        request = GenerationRequest(f"probe-v{self.synced_version}", ids, SamplingSpec(
            n=1, temperature=1.0, max_new_tokens=1, seed=0, prompt_logprobs=True))
        workers = self.pool.in_service()
        try:
            [probe] = collect(workers[0], [request], timeout_s=self.cfg.faults.sync_timeout_s) if workers else [None]
        except Exception as exc:  # noqa: BLE001 - a failed worker is found by the next rollout
            log.warning("the engine/trainer probe failed (%r); no rollout/logprob_mismatch this step", exc)
            return {}
        if probe is None or probe.prompt_logprobs is None:
            return {}
        with self._policy_lock:
            trainer = self.policy.forward_logprobs(pack_batch([ids[:1]], [ids[1:]], self.tokenizer.pad_token_id),
                                                   temperature=1.0)["logp"]
        engine = torch.tensor([probe.prompt_logprobs], dtype=torch.float32)
        return logprob_mismatch(engine, trainer[:, : engine.shape[1]], torch.ones_like(engine))

    def count_function_restarts(self) -> None:
        """Add the reward-function child processes started again since the last call to faults/reward_restarts."""
        for name, caller in self.callers.items():
            if name == "reference":
                continue
            try:
                n = ray.get(caller.server.actor.function_restarts.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - a server that does not answer is handled by its next call
                continue
            incarnation, last = self._fn_restarts.get(name, (caller.server.incarnation, 0))
            if incarnation != caller.server.incarnation:  # a new server process counts from 0
                last = 0
            if n > last:
                self.faults.add("reward_restarts", n - last)
            self._fn_restarts[name] = (caller.server.incarnation, n)

    # --------------------------------------------------------------------------- checkpoints
    def save_trainers(self, folder: Path) -> None:
        self.policy.save_checkpoint(str(folder / "policy"), "state")
        if self.critic is not None:
            self.critic.save_checkpoint(str(folder / "critic"), "state")

    def load_trainers(self, folder: Path) -> None:
        self.policy.load_checkpoint(str(folder / "policy"), "state")
        if self.critic is not None:
            self.critic.load_checkpoint(str(folder / "critic"), "state")

    # --------------------------------------------------------------------------------- ptx
    def ptx_batch(self, n: int) -> dict[str, torch.Tensor]:
        """`n` pretraining texts as a packed sub-batch with keys prefixed `ptx_` (PPO-ptx)."""
        if self._ptx is None:
            from rayrlhf.data.datasets import PromptDataset, load_rows

            rows = load_rows(self.cfg.data.pretrain, "text")
            ids = [self.tokenizer(r["text"], add_special_tokens=False)["input_ids"][: self.cfg.data.max_prompt_tokens] for r in rows]
            self._ptx = PromptDataset(rows, ids, seed=self.cfg.seed + 1)
        picked = [self._ptx.prompt_ids[i] for i in self._ptx.next_batch(n)]
        # The first token has nothing to be predicted from: it stands as the "prompt".
        packed = pack_batch([ids[:1] for ids in picked], [ids[1:] for ids in picked], self.tokenizer.pad_token_id)
        return {f"ptx_{k}": v for k, v in packed.items()}

    def shutdown(self) -> None:
        for group in (self.policy, self.critic):
            if group is not None:
                group.shutdown()
        for actor in [*self.rollout_workers, *self.servers, *self.env_actors]:
            ray.kill(actor)
        if self.colocation is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.colocation)
            self.colocation = None
        _wait_names_free([f"rollout-{i}" for i in range(len(self.rollout_workers))] + ["reference"])

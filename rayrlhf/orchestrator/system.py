"""The actors of one online RL job, created from config, and the three things the loop asks of
them: score a micro-batch, sync the weights, save or load the trainers."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch

from rayrlhf.actors.rollout import create_rollout_workers
from rayrlhf.actors.scorers import RemoteReferenceServer, RemoteRewardServer
from rayrlhf.actors.trainer_group import TrainerGroup
from rayrlhf.actors.types import Completion
from rayrlhf.actors.weight_sync import broadcast_weights, verify_weights
from rayrlhf.config import JobConfig
from rayrlhf.errors import TrainerFailed, WorkersLost
from rayrlhf.models.forward import pack_batch
from rayrlhf.models.loading import resolve_dtype
from rayrlhf.orchestrator.faults import FaultCounters, WorkerPool, dump_hang, wait_restarted
from rayrlhf.orchestrator.preflight import Checked


def old_logprobs_mode(cfg: JobConfig) -> str:
    """`algorithm.old_logprobs` resolved: "current" (the update's own forward) when a step makes exactly
    one update per sample, since the old policy then is the current one; otherwise the configured way."""
    mode = cfg.algorithm.old_logprobs
    one_update = cfg.algorithm.ppo_epochs == 1 and (cfg.trainer.mini_batch_size or cfg.samples_per_step) >= cfg.samples_per_step
    if mode == "auto":
        # Asynchronous with the KL as a reward: the penalty is measured under the weights being
        # trained (a forward), not under the stale ones that sampled.
        stale_kl = cfg.schedule.max_staleness > 0 and cfg.algorithm.kl_as_reward and cfg.algorithm.needs_reference
        return "current" if one_update and not stale_kl else "recompute"
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

    def __init__(self, cfg: JobConfig, checked: Checked, faults: FaultCounters | None = None) -> None:
        self.cfg, self.plan, self.checked = cfg, checked.plan, checked
        self.faults = faults or FaultCounters()
        self.fault_dir = Path(cfg.output_dir) / "faults"
        self._idents: dict[str, tuple[str, int]] = {}
        self.synced_version = 0  # the weight version the workers in service hold
        self.policy_path = checked.policy
        self.tokenizer = checked.tokenizer
        self.recompute_old_logp = old_logprobs_mode(cfg) == "recompute"
        # Weights travel in the engine's dtype; checksums compare the same bytes on both sides.
        self.sync_dtype = str(resolve_dtype(cfg.rollout.dtype if cfg.rollout.dtype != "auto" else cfg.model.dtype)).removeprefix("torch.")
        self.optimizer_steps = steps = (
            cfg.schedule.steps * cfg.algorithm.ppo_epochs * (cfg.samples_per_step // (cfg.trainer.mini_batch_size or cfg.samples_per_step))
        )
        log.info("creating %d rollout worker(s) (%s)", cfg.rollout.num_workers, cfg.rollout.backend)
        self.policy = self.critic = self.reference = self.eval_reward = None
        self.rollout_workers, self.rewards = [], []
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
        self.rollout_workers = create_rollout_workers(
            self.policy_path, cfg.rollout, cfg.model, cfg.seed, max_prompt_tokens=cfg.data.max_prompt_tokens,
            wait=False, max_restarts=restarts,  # engines start while the trainers do
        )
        srv, no_dropout = cfg.servers, cfg.model.disable_dropout
        # no KL computed (kl_coef 0, fixed controller): no reference server
        for ref in self.plan.of("reference"):
            self.reference = RemoteReferenceServer.options(
                name=ref.name, num_cpus=ref.num_cpus, num_gpus=ref.num_gpus, max_restarts=restarts,
            ).remote(checked.reference, cfg.model.dtype, trust, srv.micro_batch_size, cfg.rollout.temperature or 1.0,
                     no_dropout)
        self.rewards = [
            RemoteRewardServer.options(name=spec.name, num_cpus=spec.num_cpus, num_gpus=spec.num_gpus,
                                       max_restarts=restarts).remote(
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
        log.info("creating the policy trainer group (%d rank(s), ZeRO-%d)", cfg.trainer.policy.num_ranks,
                 cfg.trainer.stage_for(cfg.trainer.policy.num_ranks))
        self._start_trainers()
        ray.get([r.ready.remote() for r in self.servers])
        ray.get([w.ready.remote() for w in self.rollout_workers])
        for name, actor in self._server_names().items():
            self._idents[name] = tuple(ray.get(actor.identity.remote()))
        f = cfg.faults
        self.pool = WorkerPool(self.rollout_workers, self.faults, self.fault_dir,
                               hang_timeout_s=f.generation_timeout_s + f.generation_timeout_per_token_s * cfg.rollout.max_new_tokens,
                               restart_timeout_s=f.restart_timeout_s, heartbeat_s=f.heartbeat_s)

    def _start_trainers(self) -> None:
        cfg, f = self.cfg, self.cfg.faults
        self.policy = TrainerGroup.from_config(cfg, "policy", self.policy_path, self.optimizer_steps)
        self.critic = TrainerGroup.from_config(cfg, "critic", self.checked.critic, self.optimizer_steps) if self.checked.critic else None
        for group in (self.policy, self.critic):
            if group is not None:
                group.watch(f.train_timeout_s, f.heartbeat_s, self._dump_trainer)

    def _dump_trainer(self, role: str, ranks: list[int]) -> None:
        group = self.policy if role == "policy" else self.critic
        self.faults.add("hangs")
        for r in ranks:
            dump_hang(f"{role}-{r}", tuple(group.idents[r]), self.fault_dir, self.faults)

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

    def _server_result(self, name: str, actor: Any, ref: Any, again: Callable[[], Any]) -> Any:
        """The answer of a server call; a server that died or hung (faults.score_timeout_s) is restarted by
        Ray and asked again (`again()` makes the same call), up to faults.max_restarts times."""
        f = self.cfg.faults
        for attempt in range(f.max_restarts + 1):
            try:
                return ray.get(ref, timeout=f.score_timeout_s)
            except ray.exceptions.GetTimeoutError:
                self.faults.add("hangs")
                dump_hang(name, self._idents.get(name), self.fault_dir, self.faults)
                ray.kill(actor, no_restart=False)
                why = f"gave no answer within faults.score_timeout_s={f.score_timeout_s:.0f}s"
            except ray.exceptions.RayActorError as exc:
                why = f"died ({type(exc).__name__})"
            if attempt == f.max_restarts:
                raise RuntimeError(f"{name} {why}, after {f.max_restarts} restart(s) (faults.max_restarts)")
            self.faults.add("server_restarts")
            log.error("%s %s; it restarts, and the micro-batch is scored again", name, why)
            wait_restarted(actor, f.restart_timeout_s)  # raises when it cannot restart
            self._idents[name] = tuple(ray.get(actor.identity.remote()))
            ref = again()
        raise AssertionError("unreachable")

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
        prompts, columns = prompts_and_columns
        batch = pack_batch([c.prompt_ids for c in completions], [c.response_ids for c in completions], self.tokenizer.pad_token_id)
        responses = self.tokenizer.batch_decode([c.response_ids for c in completions], skip_special_tokens=True)
        turn = self._reward_turn % len(self.rewards)
        reward, reward_name = self.rewards[turn], self.plan.of("reward")[turn].name
        self._reward_turn += 1

        def ask_reference() -> Any:
            return self.reference.logprobs.remote(batch)

        def ask_reward() -> Any:
            return reward.score.remote(prompts, responses, columns, batch if self.cfg.model.reward else None)

        ref_ref = ask_reference() if self.reference is not None else None
        reward_ref = ask_reward()
        out = self.trainer_outputs(batch) if trainer_side else {}
        ref_logp = self._server_result("reference", self.reference, ref_ref, ask_reference) if ref_ref is not None else None
        return {"ref_logp": ref_logp, "scores": self._server_result(reward_name, reward, reward_ref, ask_reward), **out}

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
        self, completions: list[Completion], prompts_and_columns: tuple[list[str], dict[str, list]]
    ) -> dict[str, list[float | None]]:
        """Only the reward (and the held-out metric, reward.eval_function) of finished samples: evaluation."""
        prompts, columns = prompts_and_columns
        batch = pack_batch([c.prompt_ids for c in completions], [c.response_ids for c in completions], self.tokenizer.pad_token_id)
        responses = self.tokenizer.batch_decode([c.response_ids for c in completions], skip_special_tokens=True)
        turn = self._reward_turn % len(self.rewards)
        reward, reward_name = self.rewards[turn], self.plan.of("reward")[turn].name
        self._reward_turn += 1
        calls = {"scores": (reward_name, reward, lambda: reward.score.remote(prompts, responses, columns,
                                                                             batch if self.cfg.model.reward else None))}
        if self.eval_reward is not None:
            calls["true_scores"] = ("eval-reward", self.eval_reward, lambda: self.eval_reward.score.remote(prompts, responses, columns))
        refs = {k: again() for k, (_, _, again) in calls.items()}
        return {k: self._server_result(name, actor, refs[k], again) for k, (name, actor, again) in calls.items()}

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

        A worker that dies or hangs (faults.sync_timeout_s) during the sync leaves service and the sync
        goes on without it; a failure while every worker answers is the trainer's (TrainerFailed)."""
        pool, f = self.pool, self.cfg.faults
        with self._policy_lock:
            if only is None:
                joining = pool.back(0.0 if pool.live else f.restart_timeout_s)
                targets = sorted({*pool.live, *joining})
            else:
                joining = targets = list(only)
            while targets:
                try:
                    self._push(version, targets, verify or bool(joining), fresh_group=bool(joining))
                    break
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                    bad = self._unresponsive(targets)
                    if not bad:
                        raise TrainerFailed(f"the weight sync failed while every rollout worker answers: {exc!r}") from exc
                    for i in bad:
                        pool.fail(i, f"during the weight sync: {exc!r}"[:300], kill=True,
                                  hung=isinstance(exc, ray.exceptions.GetTimeoutError))
                    targets = [i for i in targets if i not in bad]
                    joining = [i for i in joining if i not in bad]
            if not targets:
                if only is not None:  # the worker that was rejoining failed again; it is restarting once more
                    return
                raise WorkersLost(f"no rollout worker is left to receive weight version {version} (lost for good: "
                                  f"{sorted(pool.lost)}, still restarting: {pool.restarting})")
            for i in joining:
                pool.rejoin(i)
            self.synced_version = version

    def _push(self, version: int, targets: list[int], verify: bool, fresh_group: bool) -> None:
        workers = [self.pool.workers[i] for i in targets]
        if fresh_group:
            self.policy.reset_weight_group()
        timeout = self.cfg.faults.sync_timeout_s
        broadcast_weights(self.policy, workers, version, self.cfg.servers.weight_sync_bucket_mb * 1024 * 1024,
                          self.sync_dtype, self.cfg.servers.weight_sync_backend, timeout_s=timeout)
        if verify:
            verify_weights(self.policy, workers, self.sync_dtype, timeout_s=timeout)

    def rejoin_worker(self, i: int) -> None:
        """On-policy, mid-rollout: restarted worker i gets the weights the rollout samples with (the trainers
        have not moved since the last sync), verified, and serves again."""
        self.sync_weights(self.synced_version, verify=True, only=[i])

    def _unresponsive(self, targets: list[int], timeout_s: float = 30.0) -> list[int]:
        """The workers among `targets` that are dead or do not answer a trivial call within `timeout_s`."""
        refs = {self.pool.workers[i].weight_version.remote(): i for i in targets}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        ok = set()
        for ref in done:
            try:
                ray.get(ref)
                ok.add(refs[ref])
            except Exception:  # noqa: BLE001 - dead
                pass
        return [i for i in targets if i not in ok]

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
        for actor in [*self.rollout_workers, *self.servers]:
            ray.kill(actor)
        _wait_names_free([f"rollout-{i}" for i in range(len(self.rollout_workers))] + ["reference"])

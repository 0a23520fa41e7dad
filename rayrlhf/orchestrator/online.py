"""The online RL loop (PPO, GRPO, RLOO, REINFORCE++): the single controller, top to bottom.

    checks    <- plan, models, tokenizers, data and reward function, before any actor (preflight)
    evaluate  <- data.eval before the first step (step 0), every schedule.eval_every steps, at the end
    launch    <- the rollouts of steps 1 .. 1 + k (k = schedule.max_staleness; 0: on-policy)
    for each step:
        rollouts  <- this step's samples (prompts_per_step rows of data.train, seeded order, resumable),
                     streamed from the workers; each finished micro-batch is scored at once:
                     reference log-probs, reward, and (on-policy) critic values and old log-probs
        refill    <- (algorithm.dynamic_sampling) groups with all-equal scores dropped; more rows drawn and
                     generated now until prompts_per_step groups differ (orchestrator/dynamic_sampling.py)
        trainers  <- (k >= 1) critic values and old log-probs under the weights that will train
        scores    <- clipped / normalised (reward.clip, reward.normalize)
        targets   <- KL to the reference, token rewards, advantages (GAE / group / RLOO / REINFORCE++)
        update    <- ppo_epochs passes of mini-batches on the policy (and critic) trainers; samples
                     of older weights are reweighted by truncated importance weights (k >= 1)
        sync      <- (after every launched rollout is done) new weights to every worker, verified
        log       <- one metrics row; a checkpoint when due (with the buffered rollouts)
        launch    <- the rollouts of step + 1 + k, generated while the next steps train
    faults    <- a trainer rank dead or hung: the trainer groups are rebuilt from the latest checkpoint
                 and the step is done again; every rollout worker lost: checkpoint and stop
                 (rollout workers and servers that die or hang are handled where they are called;
                 see orchestrator/faults.py)
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch

from rayrlhf.actors.types import Completion, GenerationRequest, SamplingSpec
from rayrlhf.algorithms import make_kl_controller
from rayrlhf.config import ConfigError, JobConfig, to_yaml
from rayrlhf.errors import FailureBudgetExceeded, Preempted, TrainerFailed, WorkersLost
from rayrlhf.orchestrator.batch import assemble
from rayrlhf.orchestrator.checkpoint import latest_checkpoint, load_rollouts, load_state, save_checkpoint
from rayrlhf.orchestrator.dynamic_sampling import fill_step
from rayrlhf.orchestrator.episodes import episode_spec, reward_inputs, stop_token_ids
from rayrlhf.orchestrator.evaluation import evaluate
from rayrlhf.orchestrator.experience import (
    RunningMoments,
    compute_advantages,
    controller_kl,
    shape_scores,
)
from rayrlhf.orchestrator.faults import FailureBudget, FaultCounters
from rayrlhf.orchestrator.metrics import MetricsWriter, progress
from rayrlhf.orchestrator.pipeline import RolloutPipeline, staleness
from rayrlhf.orchestrator.preflight import Checked, preflight
from rayrlhf.orchestrator.rollout import stream_rollouts
from rayrlhf.orchestrator.run_dir import claim_output_dir
from rayrlhf.orchestrator.samples import write_samples
from rayrlhf.orchestrator.step_metrics import step_row
from rayrlhf.orchestrator.system import System, old_logprobs_mode, sampling_distorts
from rayrlhf.orchestrator.telemetry import Telemetry
from rayrlhf.rng import rng_state, set_rng_state

log = logging.getLogger(__name__)


class _StopOnSigterm:
    """Turns SIGTERM into a request the loop reads at the next step boundary (main thread only)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM: stopping after this step, with a checkpoint")
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class OnlineRL:
    """One online RL job: owns the actors (through `System`), the data position and the KL controller."""

    def __init__(self, cfg: JobConfig, resume: bool = False, checked: Checked | None = None) -> None:
        if not cfg.algorithm.is_online:
            raise ValueError(f"algorithm.name={cfg.algorithm.name} is not online RL")
        checked = checked or preflight(cfg)  # bad input fails here, before any actor starts
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(to_yaml(cfg))
        self.telemetry = Telemetry(cfg)  # before the actors: a missing tensorboard/wandb fails fast
        self.data, self.eval_data = checked.train, checked.eval
        self.faults = FaultCounters()
        self.system = System(cfg, checked, self.faults)
        try:
            self.telemetry.watch_rollout(self.system.rollout_workers)
            self.tokenizer = self.system.tokenizer
            algo = cfg.algorithm
            self.kl_ctl = make_kl_controller(algo.kl_controller, algo.kl_coef, algo.kl_target, algo.kl_horizon)
            self.moments = RunningMoments()
            self.step = 0
            self.weight_version = 0
            self.first_length: float | None = None  # response length at step 1, for the drift figure
            self.pipeline = RolloutPipeline()
            self.trainer_failures = 0
            self.budget = FailureBudget(cfg.faults.max_failed_frac, cfg.faults.failure_window)
            # Sampled tokens show the engine/trainer mismatch only on-policy with unprocessed sampling; otherwise a
            # probe after each verified sync does (System.probe_mismatch).
            self.comparable_logprobs = cfg.schedule.max_staleness == 0 and not sampling_distorts(cfg)
            self.stop_ids = stop_token_ids(self.tokenizer, cfg.data.apply_chat_template)
            self.tool_schemas = checked.tool_schemas
            self._lost: WorkersLost | None = None  # set when a step's sync found no worker after its update
            self._data_before: dict[int, dict[str, int]] = {}  # data position before each launched step's prompts
            self._initial = (self._state(), rng_state())  # where a rebuild without any checkpoint goes back to
            resume_step = self._restore() if resume else None
            self.metrics = MetricsWriter(self.out / "metrics.jsonl", resume_from_step=resume_step)
        except BaseException:
            self.system.shutdown()
            raise

    # ----------------------------------------------------------------------------------- loop
    def run(self) -> Path:
        """Train to schedule.steps and export `final/`. SIGTERM (preemption, `ray job stop`) stops the job at
        the end of the current step, after a checkpoint: `Preempted` is raised, and --resume continues exactly.
        A dead or hung trainer rank rebuilds the trainer groups from the latest checkpoint (TrainerFailed); no
        rollout worker left ends the job after a checkpoint when the step boundary is intact (WorkersLost)."""
        cfg = self.cfg
        stop = _StopOnSigterm()
        if self.step == 0 and self.eval_data is not None:
            self._log_eval({"step": 0, "weight_version": 0, **self._evaluate()})
        bar = progress(cfg.schedule.steps, self.step, f"{cfg.algorithm.name}")
        final = self.out / "final"
        try:
            self._launch_rollouts()
            while True:
                try:
                    if self.step == cfg.schedule.steps:
                        self.system.policy.export_hf(str(final))
                        break
                    self._step(stop, bar)
                except TrainerFailed as exc:
                    self._rebuild_trainers(exc)
                except WorkersLost as exc:
                    self._stop_without_workers(exc)
                self._launch_rollouts()
            log.info("final policy written to %s", final)
            return final
        finally:
            stop.restore()
            self.pipeline.close()
            if bar is not None:
                bar.close()
            self.metrics.close()
            self.telemetry.close()

    def _step(self, stop: _StopOnSigterm, bar: Any) -> None:
        """One training step, its evaluation when due, its metrics row, and its checkpoint when due. When the
        step's update ran but its weight sync found no worker, the row is written and the job stops after a
        checkpoint of this step; past the failure budget likewise."""
        cfg = self.cfg
        self._lost = None
        row = self.train_step()
        every, last = cfg.schedule.eval_every, self.step == cfg.schedule.steps
        if self._lost is None and self.eval_data is not None and ((every and self.step % every == 0) or last):
            try:
                row.update(self._evaluate())
            except WorkersLost as exc:  # the step itself is done: its row is kept
                self._lost = exc
        self.system.count_function_restarts()
        row.update(self.faults.row())
        self.metrics.write(row)
        self.telemetry.record(row)
        self._report(bar, row)
        if self._lost is not None:
            raise self._lost  # the loop checkpoints this step (its update ran) and stops
        over = self.budget.over(row)
        due = cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0
        preempted = stop.requested and self.step < cfg.schedule.steps
        if due or preempted or over:
            folder = self.save()
            if over:
                raise FailureBudgetExceeded(f"{over}. Stopping: checkpoint {folder}; fix the cause, then continue with --resume")
            if preempted:
                raise Preempted(self.step, str(folder))

    def train_step(self) -> dict[str, Any]:
        cfg, algo = self.cfg, self.cfg.algorithm
        t_step = time.monotonic()
        self.step += 1
        stale = cfg.schedule.max_staleness > 0

        # 1-2. this step's samples, scored as they streamed in (launched k steps ago, or just now)
        self._updated = False
        scored, timings, wait_s = self.pipeline.take(self.step)
        rollout_s, trains, sampling = timings.gen_end - timings.gen_start, True, {}
        if algo.dynamic_sampling:  # only groups whose scores differ; more prompts drawn until the step is full
            filled = fill_step(cfg, scored, timings, wait_s, self._refill)
            scored, timings, wait_s, rollout_s, trains, sampling = (
                filled.scored, filled.timings, filled.wait_s, filled.rollout_s, filled.train, filled.metrics)
            if filled.metrics["rollout/informative_frac"] < 1:
                log.warning("step %d: %d of %d prompt groups informative after algorithm.max_gen_batches = %d round(s)%s",
                            self.step, filled.metrics["rollout/kept_groups"], cfg.schedule.prompts_per_step,
                            algo.max_gen_batches, "" if trains else "; no update this step")
        exp = assemble(scored, self.tokenizer.pad_token_id)
        if stale:  # the critic's values and old log-probs of the weights about to train on them
            packed = {k: exp[k] for k in ("input_ids", "attention_mask", "position_ids", "mask")}
            exp.update({k: v for k, v in self.system.trainer_outputs(packed).items() if v is not None})

        # 3. scores, KL, rewards and advantages
        kl_coef = float(self.kl_ctl.value)
        scores = shape_scores(exp["scores"], exp["valid"], cfg.reward.clip, cfg.reward.normalize, self.moments)
        adv = compute_advantages(  # the sampling policy's log-probs for the KL: the trainer's, else the engine's
            algo, scores, exp["valid"], exp["truncated"], exp["mask"], exp.get("logp", exp["sample_logp"]),
            exp.get("ref_logp"), exp.get("values"), kl_coef,
            response_len=exp["response_len"], max_new_tokens=cfg.rollout.max_new_tokens,  # soft overlong penalty
            turn_rewards=exp.get("turn_rewards"),  # episodes: each turn's reward on its last policy token
        )

        every = cfg.rollout.dump_every
        if every and self.step % every == 0:
            write_samples(self.out / "samples", self.step, exp, adv.advantages, exp["mask"], self.tokenizer,
                          [self.data.rows[i]["prompt"] for i in exp["rows"]])

        # 4. policy (and critic) updates
        t0 = time.monotonic()
        self._updated = True
        train_metrics = self._update(exp, adv) if trains else {}
        train_s = time.monotonic() - t0

        # 5. weight sync to every rollout worker, once no rollout is in flight
        t0 = time.monotonic()
        self.weight_version += 1
        every = cfg.schedule.verify_sync_every
        verify = every and (self.weight_version == 1 or self.weight_version % every == 0)
        try:
            wait_s += self.pipeline.wait_all()
            t0 = time.monotonic()
            self.system.sync_weights(self.weight_version, verify=bool(verify))
        except WorkersLost as exc:  # the update ran: this step is kept, and the job stops after its row
            self._lost = exc
        sync_s = time.monotonic() - t0

        self.kl_ctl.update(*controller_kl(adv.kl, exp["mask"], exp["valid"]))
        row = self._metrics_row(exp, adv, kl_coef, train_metrics, timings, rollout_s, train_s, sync_s, t_step)
        row["timing/rollout_wait_s"] = wait_s
        row.update(sampling)
        if not self.comparable_logprobs and verify and self._lost is None:  # engine vs trainer on fresh weights
            row.update(self.system.probe_mismatch(*exp["probe"]))
        return row

    # -------------------------------------------------------------------------------- helpers
    def _launch_rollouts(self) -> None:
        """Launch the rollouts of every step up to step + 1 + max_staleness not launched yet."""
        last = min(self.step + 1 + self.cfg.schedule.max_staleness, self.cfg.schedule.steps)
        for step in range(max([self.step, *self.pipeline.launched]) + 1, last + 1):
            self._data_before = {s: v for s, v in self._data_before.items() if s > self.step} | {step: self.data.state_dict()}
            indices = self.data.next_batch(self.cfg.schedule.prompts_per_step)  # here, in step order: resumable
            self.pipeline.launch(step, self._rollout_job(step, indices))

    def _refill(self, round_: int) -> tuple[Any, Any, float]:
        """Dynamic sampling's round `round_` (1, 2, ...) of this step: prompts_per_step more rows from the data's
        current position, at step positions past the earlier rounds', generated and scored now."""
        n = self.cfg.schedule.prompts_per_step
        return self.pipeline.run(self._rollout_job(self.step, self.data.next_batch(n), first=round_ * n))

    def _rollout_job(self, step: int, indices: list[int], first: int = 0) -> Any:
        """The rollout of data rows `indices` for step `step`, at step positions first, first + 1, ..., scored as
        it streams; to run on the pipeline's thread."""
        requests = [self._request(step, first + k, i) for k, i in enumerate(indices)]
        position = {r.request_id: first + k for k, r in enumerate(requests)}
        trainer_side = self.cfg.schedule.max_staleness == 0  # else the trainers are busy, and their weights too new

        def score(batch: list[Completion]) -> dict[str, Any]:
            positions = [position[c.request_id] for c in batch]
            rows = [indices[p - first] for p in positions]
            return {**self.system.score(batch, self._columns(batch, rows), trainer_side),
                    "positions": positions, "rows": rows}  # each completion's place in the step and in the data

        # A restarted worker gets the weights this rollout samples with (from the trainers on-policy, from the
        # last sync's kept buckets in asynchronous mode), verified, and serves at once.
        version = self.system.synced_version  # what this batch samples with, from its first sample to its last
        return lambda: stream_rollouts(
            self.system.pool, requests, score, self.cfg.rollout.micro_batch_size, rejoin=self.system.rejoin_worker,
            label=f"the rollout of step {step}" + (f" (round {first // len(indices) + 1})" if first else ""),
            expected_version=version)

    def _request(self, step: int, position: int, index: int) -> GenerationRequest:
        """The sampling request for prompt `index` of step `step`; the seed depends only on (seed, step,
        position), so a resumed run samples exactly what the uninterrupted one would have."""
        r = self.cfg.rollout
        seed = (self.cfg.seed * 1_000_003 + step * 10_007 + position * 101) % (2**31 - 1)
        spec = SamplingSpec(
            n=self.cfg.algorithm.group_size, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
            max_new_tokens=r.max_new_tokens, min_new_tokens=r.min_new_tokens, stop_token_ids=self.stop_ids, seed=seed,
        )
        return GenerationRequest(f"s{step}-p{position}", list(self.data.prompt_ids[index]), spec,
                                 episode=episode_spec(self.cfg, self.data.rows[index], self.tool_schemas))

    def _columns(self, batch: list[Completion], rows_of: list[int]) -> tuple[list[str], dict[str, list]]:
        """Raw prompts and the other data columns of each completion's row, for the reward (and an episode's
        turns as messages, `transcript`)."""
        return reward_inputs(batch, [self.data.rows[i] for i in rows_of])

    def _update(self, exp: dict[str, Any], adv: Any) -> dict[str, float]:
        """`ppo_epochs` passes of shuffled mini-batches over the policy and, for ppo, the critic."""
        cfg, algo = self.cfg, self.cfg.algorithm
        keys = ("input_ids", "attention_mask", "position_ids", "mask")
        data = {k: exp[k] for k in keys}
        data["mask"] = adv.loss_mask  # scored samples' tokens (less truncated ones under algorithm.overlong_filter)
        data.update(advantages=adv.advantages, sample_logp=exp["sample_logp"])
        mode = old_logprobs_mode(cfg)  # "current": one update per step, its own forward is the old policy
        if mode != "current":
            data["old_logp"] = exp["logp"] if mode == "recompute" else exp["sample_logp"]
        if "ref_logp" in exp:
            data["ref_logp"] = exp["ref_logp"]
        if adv.returns is not None:
            data.update(old_values=exp["values"], returns=adv.returns)
        policy_args = {
            "clip_eps": algo.clip_eps, "clip_eps_high": algo.clip_eps_high, "agg": algo.loss_agg,
            "policy_loss": algo.policy_loss,
            "agg_constant": float(cfg.rollout.max_new_tokens),  # Dr. GRPO's normaliser: the generation budget
            "temperature": cfg.rollout.temperature or 1.0,
            "kl_coef": 0.0 if algo.kl_as_reward else float(self.kl_ctl.value), "kl_estimator": algo.kl_estimator,
        }
        if algo.ptx_coef > 0:
            policy_args["ptx_coef"] = algo.ptx_coef
        if cfg.schedule.max_staleness > 0 and mode != "rollout":  # old_logp is the proximal policy: reweight
            policy_args["is_cap"] = algo.importance_cap
        n = exp["input_ids"].shape[0]
        mini = cfg.trainer.mini_batch_size or n
        rng = torch.Generator().manual_seed(cfg.seed * 7919 + self.step)
        sums: dict[str, float] = {}
        count, first_mismatch = 0, float("nan")
        for _ in range(algo.ppo_epochs):
            order = torch.randperm(n, generator=rng)
            for start in range(0, n, mini):
                idx = order[start : start + mini]
                mb = {k: v[idx] for k, v in data.items()}
                if algo.ptx_coef > 0:
                    mb.update(self.system.ptx_batch(mini))
                with self.system.policy_lock:  # scoring threads may ask the policy group for log-probs meanwhile
                    metrics = {f"policy/{k}": v for k, v in self.system.policy.train_step(mb, "ppo", policy_args).items()}
                if self.system.critic is not None:
                    critic_args = {"value_clip_eps": algo.value_clip_eps}
                    metrics.update({f"critic/{k}": v for k, v in self.system.critic.train_step(mb, "value", critic_args).items()})
                if count == 0 and "policy/logprob_mismatch" in metrics:  # the first mini-batch: before any update
                    first_mismatch = metrics["policy/logprob_mismatch"]
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
        out = {k: v / count for k, v in sums.items() if k != "policy/logprob_mismatch"}
        if "logp" not in exp and count and self.comparable_logprobs:  # no scoring forward: the update's first one
            out["rollout/logprob_mismatch"] = first_mismatch
        return out

    def _metrics_row(self, exp, adv, kl_coef, train, timings, rollout_s, train_s, sync_s, t_step) -> dict[str, Any]:
        length = float(exp["response_len"].mean())
        if self.first_length is None:
            self.first_length = length
        row = step_row(exp, adv, kl_coef, timings, rollout_s, self.comparable_logprobs)
        row.update({
            "step": self.step, "weight_version": self.weight_version, "kl/coef": kl_coef,
            "response/length_drift": length / max(self.first_length, 1e-9), "rollout/backend": self.cfg.rollout.backend,
            **staleness(self.step, exp["versions"]), "timing/step_s": time.monotonic() - t_step,
            "timing/train_s": train_s, "timing/sync_s": sync_s, "data/epoch": self.data.epoch,
        })
        row.update(train)
        return row

    def _evaluate(self) -> dict[str, float]:
        assert self.eval_data is not None
        return evaluate(self.system, self.eval_data, self.cfg, self.step, self.stop_ids, self.tool_schemas)

    def _log_eval(self, row: dict[str, Any]) -> None:
        self.metrics.write(row)
        self.telemetry.record(row)
        log.info("eval at step %d: reward %.4f", row["step"], row.get("eval/reward_mean", float("nan")))

    def _report(self, bar: Any, row: dict[str, Any]) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward/mean']:.3f}", kl=f"{row['kl/mean']:.4f}")
        else:
            log.info("step %d/%d reward %.4f kl %.5f (%.1fs)%s", self.step, self.cfg.schedule.steps, row["reward/mean"],
                     row["kl/mean"], row["timing/step_s"],
                     f" eval reward {row['eval/reward_mean']:.4f}" if "eval/reward_mean" in row else "")

    # ---------------------------------------------------------------------------- checkpoints
    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "weight_version": self.weight_version,
            "data": self.data.state_dict(),
            "kl_controller": self.kl_ctl.state_dict(),
            "reward_moments": self.moments.state_dict(),
            "first_length": self.first_length,
            "max_staleness": self.cfg.schedule.max_staleness,
            "faults": self.faults.state_dict(),
        }

    def save(self, data_state: dict[str, int] | None = None, rollouts: dict[int, Any] | None = None) -> Path:
        """A checkpoint of this step boundary (`data_state`/`rollouts`: the data position and buffered batches
        to record instead of the current ones, when the launched batches are thrown away)."""
        state = self._state()
        if data_state is not None:
            state["data"] = data_state
        return save_checkpoint(  # at a step boundary: every launched rollout finished before the sync
            self.out / "checkpoints", self.step, state, self.system.save_trainers, self.cfg.checkpoint.keep_last,
            self.pipeline.state_dict() if rollouts is None else rollouts,
        )

    # ------------------------------------------------------------------------------ faults
    def _rebuild_trainers(self, exc: TrainerFailed) -> None:
        """A rank died or hung: rebuild the trainer groups, go back to the latest checkpoint (or the start). A rank
        failing again during the rebuild counts as one more failure, within faults.trainer_restarts."""
        limit = self.cfg.faults.trainer_restarts
        while True:
            self.trainer_failures += 1
            if self.trainer_failures > limit:
                raise TrainerFailed(f"{exc} -- the trainer groups were already rebuilt {limit} time(s) "
                                    "(faults.trainer_restarts)") from exc
            self.faults.add("trainer_restarts")
            folder = latest_checkpoint(self.out / "checkpoints")
            log.error("%s; rebuilding the trainer groups from %s (rebuild %d of at most %d)", exc,
                      folder or "the initial weights (no checkpoint yet)", self.trainer_failures, limit)
            self.pipeline.discard()  # batches in flight belong to the abandoned timeline
            try:
                self.system.restart_trainers()
                if folder is None:
                    state, rng = self._initial
                    set_rng_state(rng)
                    self._apply(state, {}, None)
                else:
                    self._apply(load_state(folder), load_rollouts(folder), folder)
                break
            except TrainerFailed as again:
                exc = again
        self.metrics.truncate(self.step)
        log.warning("trainer groups rebuilt; continuing from step %d", self.step)

    def _stop_without_workers(self, exc: WorkersLost) -> None:
        """No rollout worker is left: checkpoint this step boundary and stop.

        Before the step's update, the step is given back (its prompts return to the data) and the previous
        boundary is saved. After it, this step is kept: the checkpoint holds its trainers, and the batches of
        later steps that finished (asynchronous mode) with the prompts of the rest given back."""
        if not self._updated:  # the trainers are as the previous step left them
            failed = self.step
            self.step -= 1
            self.pipeline.discard()
            folder = self.save(data_state=self._data_before[failed], rollouts={})
        else:
            saved, first_failed = self.pipeline.salvage()
            data_state = self._data_before[first_failed] if first_failed is not None else None
            folder = self.save(data_state=data_state, rollouts=saved)
        raise WorkersLost(f"{exc}. Stopping: checkpoint {folder}; continue with --resume once rollout workers can start "
                          "again") from exc

    def _restore(self) -> int | None:
        folder = claim_output_dir(self.out, resume=True)  # a resume that cannot resume stops (exit 2), changing nothing
        state = load_state(folder)
        saved_k = int(state.get("max_staleness", 0))
        if saved_k != self.cfg.schedule.max_staleness:
            raise ConfigError(
                f"schedule.max_staleness={self.cfg.schedule.max_staleness}, but {folder} was saved with {saved_k}: its "
                "buffered rollouts and data position belong to that setting; resume with the same value"
            )
        self.faults.load_state_dict(state.get("faults", {}))
        self._apply(state, load_rollouts(folder), folder)
        log.info("resumed from %s (step %d)", folder, self.step)
        return self.step

    def _apply(self, state: dict[str, Any], rollouts: dict[int, Any], folder: Path | None) -> None:
        """Take the run back to `state` (trainers from `folder`, else as freshly built) and sync the workers."""
        self.step = int(state["step"])
        self.weight_version = int(state["weight_version"])
        self.data.load_state_dict(state["data"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.moments.load_state_dict(state["reward_moments"])
        self.first_length = state["first_length"]
        self.pipeline.load_state_dict(rollouts)
        if folder is not None:
            self.system.load_trainers(folder)
        self.system.sync_weights(self.weight_version, verify=True)

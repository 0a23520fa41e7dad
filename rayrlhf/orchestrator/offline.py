"""The offline loop (SFT, reward model, DPO): one trainer group, top to bottom.

    data       <- data.train and data.eval, tokenized and checked before any actor starts
    group      <- a DeepSpeed trainer group: the policy (sft, dpo) or a reward model (rm)
    reference  <- dpo only: every pair's sequence log-probs under the frozen reference, once
    for each step:
        rows   <- the next mini-batch of this epoch's seeded order
        update <- one optimizer step: response-token NLL (sft; a conversation's assistant tokens only),
                  Bradley-Terry (rm) or DPO
        eval   <- every schedule.eval_every steps and at the end (also before the first step)
        log    <- one metrics row; a checkpoint when due
    final/     <- the trained model in Hugging Face format

Batches: `trainer.mini_batch_size` rows per optimizer step, or `schedule.prompts_per_step`
when unset; it must divide by the rank count. An epoch is `len(data.train) // mini` steps:
the last incomplete mini-batch of each epoch is dropped (the next epoch reshuffles, so
every row is seen). The run lasts `min(schedule.steps, schedule.epochs * steps_per_epoch)`
steps. The data order is a function of (seed, step), so `--resume` takes the same rows as an
uninterrupted run.

`model.policy` is the model trained: the policy for sft and dpo, and for rm the causal LM (or
reward model) the reward model starts from; a one-output `score` head is added. DPO's
reference is `model.reference`, defaulting to `model.policy`.

With `model.lora` the model trains a LoRA adapter (a reward model's new score head trains whole
beside it); checkpoints hold the adapter and its optimizer state, `final/` the adapter in peft's
format, and DPO's reference is the model with its adapter switched off.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch
import torch.nn.functional as F

from rayrlhf.actors.scorers import RemoteReferenceServer
from rayrlhf.actors.trainer_group import TrainerGroup
from rayrlhf.algorithms import dpo_loss, sequence_logprob
from rayrlhf.config import JobConfig, to_yaml
from rayrlhf.data.examples import Example, load_examples
from rayrlhf.errors import InvalidInput
from rayrlhf.models.forward import pack_batch
from rayrlhf.models.loading import load_tokenizer
from rayrlhf.models.tiny import resolve_model_path
from rayrlhf.orchestrator.checkpoint import load_state, save_checkpoint
from rayrlhf.orchestrator.metrics import MetricsWriter, progress

log = logging.getLogger(__name__)

ROLES = {"sft": "policy", "rm": "reward", "dpo": "policy"}
LOSSES = {"sft": "sft", "rm": "bt", "dpo": "dpo"}
FORWARD_ROWS = 256  # rows per forward-only call (evaluation, reference log-probs)
Batch = dict[str, torch.Tensor]


class OfflineTrainer:
    """One sft / rm / dpo job. The constructor only reads data (bad input fails fast); `run` starts the actors."""

    def __init__(self, cfg: JobConfig, resume: bool = False) -> None:
        algo = cfg.algorithm.name
        if algo not in LOSSES:
            raise ValueError(f"algorithm.name={algo} is not an offline algorithm")
        fields = "prompt and response (or messages)" if algo == "sft" else "prompt, chosen and rejected"
        if not cfg.data.train:
            raise InvalidInput(f"algorithm.name={algo} needs data.train: a jsonl/parquet file or dataset with {fields}")
        self.cfg, self.algo, self.role, self.resume = cfg, algo, ROLES[algo], resume
        self.out = Path(cfg.output_dir)
        trust = cfg.model.trust_remote_code
        self.model_path = resolve_model_path(cfg.model.policy, self.out / ".models", cfg.seed)
        from rayrlhf.orchestrator.preflight import refuse_adapter_dir

        refuse_adapter_dir("model.policy", self.model_path)
        self.tokenizer = load_tokenizer(self.model_path, trust)
        kind = "sft" if algo == "sft" else "pairs"
        if cfg.model.lora is not None:
            from rayrlhf.orchestrator.preflight import check_lora_targets

            check_lora_targets(cfg, self.model_path, self.role)
        self.train, _ = load_examples(cfg.data.train, kind, self.tokenizer, cfg.data)
        self.eval = load_examples(cfg.data.eval, kind, self.tokenizer, cfg.data)[0] if cfg.data.eval else []
        self.mini = cfg.trainer.mini_batch_size or cfg.schedule.prompts_per_step
        where = "trainer.mini_batch_size" if cfg.trainer.mini_batch_size else "schedule.prompts_per_step"
        ranks = cfg.trainer.policy.num_ranks
        if self.mini % ranks:
            raise InvalidInput(f"{where} = {self.mini} rows per step must split evenly over trainer.policy.num_ranks = {ranks}")
        if self.mini > len(self.train):
            raise InvalidInput(f"{where} = {self.mini} is more than the {len(self.train)} usable rows of {cfg.data.train}")
        self.steps_per_epoch = len(self.train) // self.mini
        self.total_steps = min(cfg.schedule.steps, cfg.schedule.epochs * self.steps_per_epoch)
        self.step = 0
        self.group: TrainerGroup | None = None
        self.ref: dict[str, torch.Tensor] = {}
        self.metrics: MetricsWriter | None = None

    # ----------------------------------------------------------------------------------- loop
    def run(self) -> Path:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(to_yaml(cfg))
        log.info("%s: %d train rows, %d eval rows, %d rows per step, %d steps (%d per epoch)", self.algo,
                 len(self.train), len(self.eval), self.mini, self.total_steps, self.steps_per_epoch)
        self.group = TrainerGroup.from_config(cfg, self.role, self.model_path, self.total_steps,
                                              name_prefix=f"{self.algo}-{self.role}")
        if self.algo == "dpo":
            self.ref = self._reference_logps()  # before any update (and before a resumed state is loaded)
        resumed = self._restore() if self.resume else None
        self.metrics = MetricsWriter(self.out / "metrics.jsonl", resume_from_step=resumed)
        if resumed is None and self.eval:
            self.metrics.write({"step": 0, **self.evaluate()})
        bar = progress(self.total_steps, self.step, self.algo)
        every = cfg.schedule.eval_every
        try:
            while self.step < self.total_steps:
                row = self.train_step()
                if self.eval and ((every and self.step % every == 0) or self.step == self.total_steps):
                    row.update(self.evaluate())
                self.metrics.write(row)
                self._report(bar, row)
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save()
            final = self.out / "final"
            self.group.export_hf(str(final))
            log.info("%s: final model written to %s", self.algo, final)
            return final
        finally:
            if bar is not None:
                bar.close()
            self.metrics.close()

    def train_step(self) -> dict[str, Any]:
        t_step = time.monotonic()
        epoch, index = divmod(self.step, self.steps_per_epoch)
        self.step += 1
        rows = self._epoch_order(epoch)[index * self.mini : (index + 1) * self.mini]
        batch = self._batch([self.train[i] for i in rows])
        if self.algo == "dpo":
            batch["ref_chosen_logp"] = self.ref["train_chosen"][rows]
            batch["ref_rejected_logp"] = self.ref["train_rejected"][rows]
        t0 = time.monotonic()
        stats = self.group.train_step(batch, LOSSES[self.algo], self._loss_args())
        train_s = time.monotonic() - t0
        tokens = sum(float(v.sum()) for k, v in batch.items() if k.endswith("mask") and not k.endswith("attention_mask"))
        return {
            "step": self.step,
            "data/epoch": epoch,
            **{f"train/{k}": v for k, v in stats.items()},
            "train/rows": len(rows),
            "throughput/tokens_per_s": tokens / max(train_s, 1e-9),
            "timing/train_s": train_s,
            "timing/step_s": time.monotonic() - t_step,
        }

    def evaluate(self) -> dict[str, float]:
        """Held-out figures: sft `eval/loss` (response-token NLL); rm and dpo `eval/accuracy` (share of
        pairs whose chosen response scores strictly above the rejected one), `eval/margin` and `eval/loss`."""
        t0 = time.monotonic()
        if self.algo == "sft":
            nll, tokens = 0.0, 0.0
            for chunk in _chunks(self.eval):
                batch = self._sft_batch(chunk)
                logp = self._logprobs(batch)
                nll, tokens = nll - float((logp * batch["mask"]).sum()), tokens + float(batch["mask"].sum())
            out = {"eval/loss": nll / tokens}
        elif self.algo == "rm":
            chosen, rejected = (self._per_pair(self.eval, i, self._scores) for i in (0, 1))
            margin = chosen - rejected
            out = {"eval/loss": float(-F.logsigmoid(margin).mean())}
        else:
            a = self.cfg.algorithm
            chosen, rejected = (self._per_pair(self.eval, i, self._logprobs) for i in (0, 1))
            loss, r_chosen, r_rejected = dpo_loss(chosen, rejected, self.ref["eval_chosen"], self.ref["eval_rejected"],
                                                  beta=a.beta, label_smoothing=a.label_smoothing)
            margin = r_chosen - r_rejected
            out = {"eval/loss": float(loss), "eval/chosen_reward": float(r_chosen.mean()),
                   "eval/rejected_reward": float(r_rejected.mean())}
        if self.algo != "sft":
            out |= {"eval/accuracy": float((margin > 0).float().mean()), "eval/margin": float(margin.mean())}
        return {**out, "timing/eval_s": time.monotonic() - t0}

    # -------------------------------------------------------------------------------- helpers
    @property
    def _pad(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.train)))
        if self.cfg.data.shuffle:
            random.Random(self.cfg.seed * 100003 + epoch).shuffle(order)
        return order

    def _batch(self, examples: list[Example]) -> Batch:
        """The packed batch of a step: one sub-batch for sft, `chosen_` and `rejected_` ones for pairs."""
        prompts = [e.prompt_ids for e in examples]
        if self.algo == "sft":
            return self._sft_batch(examples)
        batch: Batch = {}
        for i, prefix in enumerate(("chosen_", "rejected_")):
            packed = pack_batch(prompts, [e.responses[i] for e in examples], self._pad)
            batch.update({prefix + k: v for k, v in packed.items()})
        return batch

    def _sft_batch(self, examples: list[Example]) -> Batch:
        """SFT rows packed; a conversation's `loss_mask` keeps its user and tool turns out of the loss."""
        return pack_batch([e.prompt_ids for e in examples], [e.responses[0] for e in examples], self._pad,
                          masks=[e.loss_mask for e in examples])

    def _loss_args(self) -> dict[str, Any]:
        a = self.cfg.algorithm
        if self.algo == "sft":
            return {"agg": a.loss_agg, "temperature": 1.0}
        if self.algo == "dpo":
            return {"beta": a.beta, "label_smoothing": a.label_smoothing, "temperature": 1.0}
        return {}

    def _logprobs(self, batch: Batch) -> torch.Tensor:
        return self.group.forward_logprobs(batch, temperature=1.0)["logp"]

    def _scores(self, batch: Batch) -> torch.Tensor:
        return self.group.forward_scores(batch)

    def _per_pair(self, examples: list[Example], which: int, call: Callable[[Batch], torch.Tensor]) -> torch.Tensor:
        """One figure per pair for response `which` (0 chosen, 1 rejected): a score, or a sequence log-prob."""
        out = []
        for chunk in _chunks(examples):
            batch = pack_batch([e.prompt_ids for e in chunk], [e.responses[which] for e in chunk], self._pad)
            value = call(batch)
            out.append(value if value.dim() == 1 else sequence_logprob(value, batch["mask"]))
        return torch.cat(out)

    def _reference_logps(self) -> dict[str, torch.Tensor]:
        """Sequence log-probs of every train and eval pair under the frozen reference, computed once.

        The reference is `model.reference`, or the policy itself before its first update (then
        the policy group computes them and no extra copy of the model is loaded); with a LoRA adapter,
        the policy with its adapter switched off.
        """
        cfg, t0 = self.cfg, time.monotonic()
        ref_path = resolve_model_path(cfg.model.reference or cfg.model.policy, self.out / ".models", cfg.seed)
        server, call = None, self._logprobs
        if cfg.model.lora is not None:
            call = lambda b: self.group.forward_logprobs(b, temperature=1.0, adapter=False)["logp"]  # noqa: E731
        if ref_path != self.model_path:
            srv = cfg.servers
            server = RemoteReferenceServer.options(num_cpus=srv.reference_num_cpus, num_gpus=srv.reference_num_gpus).remote(
                ref_path, cfg.model.dtype, cfg.model.trust_remote_code, srv.micro_batch_size, 1.0)
            call = lambda b: ray.get(server.logprobs.remote(b))  # noqa: E731
        try:
            ref = {f"{split}_{name}": self._per_pair(examples, i, call)
                   for split, examples in (("train", self.train), ("eval", self.eval))
                   for i, name in enumerate(("chosen", "rejected")) if examples}
        finally:
            if server is not None:
                ray.kill(server)
        log.info("dpo: reference log-probs of %d pairs from %s in %.1fs", len(self.train) + len(self.eval), ref_path,
                 time.monotonic() - t0)
        return ref

    def _report(self, bar: Any, row: dict[str, Any]) -> None:
        shown = {k.split("/")[-1] if k.startswith("train/") else k: row[k]
                 for k in ("train/loss", "eval/loss", "eval/accuracy") if k in row}
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()})
        elif "eval/loss" in row or self.step % max(1, self.total_steps // 20) == 0 or self.step == 1:
            log.info("%s step %d/%d %s (%.2fs)", self.algo, self.step, self.total_steps,
                     " ".join(f"{k} {v:.4f}" for k, v in shown.items()), row["timing/step_s"])

    # ---------------------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        state = {"step": self.step, "algorithm": self.algo, "mini_batch_size": self.mini,
                 "steps_per_epoch": self.steps_per_epoch}
        return save_checkpoint(self.out / "checkpoints", self.step,  state,
                               lambda folder: self.group.save_checkpoint(str(folder / self.role), "state"),
                               self.cfg.checkpoint.keep_last)

    def _restore(self) -> int | None:
        from rayrlhf.orchestrator.run_dir import claim_output_dir

        folder = claim_output_dir(self.out, resume=True)  # a resume that cannot resume stops (exit 2), changing nothing
        state = load_state(folder)
        if (state.get("mini_batch_size"), state.get("steps_per_epoch")) != (self.mini, self.steps_per_epoch):
            log.warning("--resume: the checkpoint had %s rows per step and %s steps per epoch, this run %d and %d; "
                        "the data order will differ from an uninterrupted run", state.get("mini_batch_size"),
                        state.get("steps_per_epoch"), self.mini, self.steps_per_epoch)
        self.group.load_checkpoint(str(folder / self.role), "state")
        self.step = int(state["step"])
        log.info("resumed from %s (step %d)", folder, self.step)
        return self.step

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.shutdown()
            self.group = None


def _chunks(examples: list[Example]) -> list[list[Example]]:
    return [examples[i : i + FORWARD_ROWS] for i in range(0, len(examples), FORWARD_ROWS)]

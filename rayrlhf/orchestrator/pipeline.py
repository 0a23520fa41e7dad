"""The rollout pipeline: which step's samples are being generated, and which are ready.

With `schedule.max_staleness` k the samples of step t are launched right after step t-k-1's
weight sync, so generation of up to k steps ahead runs while the trainers train. Weight
updates reach the engines *between* batches: the orchestrator waits for every launched batch
before it syncs, so each batch is sampled by one known weight version from start to end (AReaL
and verl's fully-async mode instead interrupt in-flight requests and continue them on the new
weights; that overlaps more, but a sample then mixes versions and a resume cannot redo it
exactly). At a step boundary nothing is in flight, so a checkpoint holds every buffered batch
whole and a resumed run continues with exactly the samples the uninterrupted one used.

k = 0 is the on-policy loop: step t's batch is launched after sync t-1 and taken at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import torch

from rayrlhf.actors.types import Completion
from rayrlhf.orchestrator.rollout import RolloutTimings

Scored = list[tuple[list[Completion], dict[str, Any]]]
# generate() -> (scored completions, timings): runs one step's rollout to completion
Generate = Callable[[], tuple[Scored, RolloutTimings]]


class RolloutPipeline:
    """Batches by training step: launched (a future) or restored from a checkpoint (ready)."""

    def __init__(self) -> None:
        # One thread: batches are generated in step order, each one alone on the workers, so
        # which worker samples what does not depend on timing (a resumed run assigns the same).
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout")
        self._batches: dict[int, Future] = {}

    def launch(self, step: int, generate: Generate) -> None:
        """Start `generate`: the rollout (and scoring) of the samples step `step` will train on."""
        if step in self._batches:
            raise RuntimeError(f"the samples of step {step} were already launched")
        self._batches[step] = self._pool.submit(generate)

    def take(self, step: int) -> tuple[Scored, RolloutTimings, float]:
        """Step `step`'s samples, waiting for them if needed; also returns the seconds waited."""
        if step not in self._batches:
            raise RuntimeError(f"the samples of step {step} were never launched (launched: {sorted(self._batches)})")
        start = time.monotonic()
        scored, timings = self._batches.pop(step).result()
        return scored, timings, time.monotonic() - start

    def run(self, generate: Generate) -> tuple[Scored, RolloutTimings, float]:
        """Run one more rollout now, on the pipeline's thread after the batches already launched, and wait for
        it (a dynamic-sampling refill): two rollouts never share the workers, and it is never buffered across
        a step boundary, so checkpoints are unchanged. Also returns the seconds waited."""
        start = time.monotonic()
        scored, timings = self._pool.submit(generate).result()
        return scored, timings, time.monotonic() - start

    def wait_all(self) -> float:
        """Block until every launched batch has finished (before a weight sync); returns the seconds waited."""
        start = time.monotonic()
        for future in self._batches.values():
            future.result()
        return time.monotonic() - start

    @property
    def launched(self) -> list[int]:
        return sorted(self._batches)

    def discard(self) -> None:
        """Wait for the batches in flight to end (their errors included) and forget every batch."""
        for future in self._batches.values():
            try:
                future.result()
            except Exception:  # noqa: BLE001 - these samples are thrown away anyway
                pass
        self._batches.clear()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[int, Any]:
        """Every buffered batch as plain lists and tensors (loadable with weights_only=True); call at a
        step boundary, when nothing is in flight."""
        if any(not f.done() for f in self._batches.values()):
            raise RuntimeError("a checkpoint needs every launched batch finished (call wait_all first)")
        return self._saved(self._batches)

    def salvage(self) -> tuple[dict[int, Any], int | None]:
        """After a rollout failed: wait for every launched batch to end; return the finished batches before the
        first failed one (as `state_dict` does) and that step (None when none failed). Everything is forgotten:
        the prompts of the failed batch and of those after it go back to the data."""
        first_failed = None
        for step in sorted(self._batches):
            try:
                self._batches[step].result()
            except Exception:  # noqa: BLE001 - the failure itself was raised to the loop already
                first_failed = step if first_failed is None else first_failed
        kept = {s: f for s, f in self._batches.items() if first_failed is None or s < first_failed}
        saved = self._saved(kept)
        self._batches.clear()
        return saved, first_failed

    @staticmethod
    def _saved(batches: dict[int, Future]) -> dict[int, Any]:
        out = {}
        for step, future in batches.items():
            scored, timings = future.result()
            out[step] = {
                "chunks": [{"completions": [asdict(c) for c in batch], "result": result} for batch, result in scored],
                "timings": [timings.gen_start, timings.gen_end, timings.score_intervals],
            }
        return out

    def load_state_dict(self, state: dict[int, Any]) -> None:
        for step, saved in state.items():
            scored = [([Completion(**c) for c in ch["completions"]], ch["result"]) for ch in saved["chunks"]]
            gen_start, gen_end, intervals = saved["timings"]
            future: Future = Future()
            future.set_result((scored, RolloutTimings(gen_start, gen_end, [tuple(i) for i in intervals])))
            self._batches[int(step)] = future


def staleness(step: int, versions: list[int]) -> dict[str, float]:
    """How many updates behind the weights being trained each sample's weights are: (step - 1) - version."""
    lag = torch.tensor([step - 1 - v for v in versions], dtype=torch.float32)
    return {"rollout/staleness_min": float(lag.min()), "rollout/staleness_mean": float(lag.mean()),
            "rollout/staleness_max": float(lag.max())}

"""Training metrics beyond metrics.jsonl: Ray metrics (Prometheus / dashboard), TensorBoard, W&B.

The online loop calls `Telemetry.record(row)` once per step with the same row it writes to
metrics.jsonl. What goes where is chosen by the `logging` config section:

- `logging.ray_metrics` (default on): `ray.util.metrics` gauges and counters, recorded in the
  driver. Ray exports them from the metrics agent of the driver's node, on that node's
  Prometheus endpoint (`ray start --metrics-export-port`), where Prometheus scrapes them and
  the dashboard's Metrics view and Grafana show them. Ray prefixes every name with `ray_`,
  and counters get `_total`: `rayrlhf_reward_mean` is scraped as `ray_rayrlhf_reward_mean`.
- `logging.tensorboard`: event files under `output_dir/tensorboard`.
- `logging.wandb_project`: a Weights & Biases run. The API key comes only from the
  environment (WANDB_API_KEY, or wandb's own login); it is never written to the config or logs.

A background thread samples the in-flight samples of every rollout worker
(`RolloutWorker.load()`) every `logging.in_flight_poll_s` seconds, so the gauge moves during
the rollout phase and not only at step boundaries. Metrics are best-effort: a failure to
export is logged once and never stops training.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rayrlhf.config import ConfigError, JobConfig

log = logging.getLogger(__name__)

PREFIX = "rayrlhf_"

# Gauges set from a metrics row: metric name -> (row key, description).
ROW_GAUGES: dict[str, tuple[str, str]] = {
    "step": ("step", "Last finished training step."),
    "weight_version": ("weight_version", "Weight version the rollout workers hold after the last sync."),
    "reward_mean": ("reward/mean", "Mean score of the step's scored samples."),
    "reward_std": ("reward/std", "Standard deviation of the step's scores."),
    "kl_mean": ("kl/mean", "Mean per-token KL(policy || reference) over response tokens."),
    "kl_coef": ("kl/coef", "KL coefficient beta used in the step."),
    "response_length_mean": ("response/length_mean", "Mean response length, tokens."),
    "throughput_tokens_per_s": ("throughput/tokens_per_s", "Generated tokens per second of rollout wall time."),
    "rollout_min_weight_version": ("rollout/min_weight_version", "Oldest weight version among the step's samples."),
    "eval_reward_mean": ("eval/reward_mean", "Mean reward of the policy's responses to data.eval at the last evaluation."),
}
# Phase durations, one gauge with a `phase` tag: tag value -> row key.
PHASES: dict[str, str] = {
    "step": "timing/step_s",
    "rollout": "timing/rollout_s",
    "score": "timing/score_s",
    "train": "timing/train_s",
    "sync": "timing/sync_s",
}
# Every other numeric key of the row (policy/loss, critic/..., advantages/mean, ...) goes to
# one gauge tagged with its key, so nothing in metrics.jsonl is missing from the dashboard.
OTHER_GAUGE = "step_metric"


def metric_names() -> list[str]:
    """The names this module registers (before Ray's `ray_` prefix and the counters' `_total`)."""
    names = [PREFIX + n for n in ROW_GAUGES]
    names += [PREFIX + n for n in ("phase_seconds", "rollout_in_flight", OTHER_GAUGE)]
    names += [PREFIX + n for n in ("steps", "samples", "generated_tokens", "reward_failed", "faults")]
    return names


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class _RayMetrics:
    """`ray.util.metrics` gauges and counters, all tagged with the run name and algorithm."""

    def __init__(self, run: str, algorithm: str) -> None:
        from ray.util.metrics import Counter, Gauge

        keys = ("run", "algorithm")
        self.tags = {"run": run, "algorithm": algorithm}
        self.gauges = {
            name: Gauge(PREFIX + name, description=desc, tag_keys=keys) for name, (_, desc) in ROW_GAUGES.items()
        }
        self.phase = Gauge(PREFIX + "phase_seconds", description="Wall time of the last step's phases, s.", tag_keys=(*keys, "phase"))
        self.in_flight = Gauge(
            PREFIX + "rollout_in_flight", description="Samples submitted to a rollout worker and not yet returned.",
            tag_keys=(*keys, "worker"),
        )
        self.other = Gauge(PREFIX + OTHER_GAUGE, description="Any other numeric value of the step's metrics row.", tag_keys=(*keys, "key"))
        self.steps = Counter(PREFIX + "steps", description="Training steps finished.", tag_keys=keys)
        self.samples = Counter(PREFIX + "samples", description="Samples generated and scored.", tag_keys=keys)
        self.tokens = Counter(PREFIX + "generated_tokens", description="Response tokens generated.", tag_keys=keys)
        self.failed = Counter(PREFIX + "reward_failed", description="Samples the reward could not score.", tag_keys=keys)
        self.faults = Counter(PREFIX + "faults", description="Fault events (restarts, re-sent samples, hangs, dumps), by kind.",
                              tag_keys=(*keys, "kind"))
        self._faults_seen: dict[str, float] = {}  # the rows carry running totals; the counter gets the increments
        self.known = {key for key, _ in ROW_GAUGES.values()} | set(PHASES.values())

    def record(self, row: dict[str, Any], samples: int) -> None:
        for name, (key, _) in ROW_GAUGES.items():
            value = _finite(row.get(key))
            if value is not None:
                self.gauges[name].set(value, tags=self.tags)
        for phase, key in PHASES.items():
            value = _finite(row.get(key))
            if value is not None:
                self.phase.set(value, tags={**self.tags, "phase": phase})
        for key, raw in row.items():
            value = _finite(raw)
            if key not in self.known and value is not None:
                self.other.set(value, tags={**self.tags, "key": key})
        for key, raw in row.items():
            value = _finite(raw)
            if key.startswith("faults/") and value is not None:
                kind = key.removeprefix("faults/")
                delta = value - self._faults_seen.get(kind, 0.0)
                self._faults_seen[kind] = value
                if delta > 0:
                    self.faults.inc(delta, tags={**self.tags, "kind": kind})
        if "reward/mean" not in row:  # an evaluation-only row (step 0): no training step to count
            return
        self.steps.inc(1, tags=self.tags)
        if samples:
            self.samples.inc(samples, tags=self.tags)
        length = _finite(row.get("response/length_mean"))
        if length and samples:
            self.tokens.inc(length * samples, tags=self.tags)
        failed = _finite(row.get("reward/failed"))
        if failed:
            self.failed.inc(failed, tags=self.tags)

    def set_in_flight(self, worker: str, value: float) -> None:
        self.in_flight.set(value, tags={**self.tags, "worker": worker})


class Telemetry:
    """Sends each step's metrics row to the sinks the `logging` config section turns on."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        lc = cfg.logging
        self.run_name = lc.run_name or Path(cfg.output_dir).resolve().name or "run"
        self._failed: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ray: _RayMetrics | None = None
        self.tensorboard = None
        self.wandb = None
        # Missing optional packages are configuration errors, raised before any actor starts.
        if lc.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "logging.tensorboard: true needs the 'tensorboard' package (pip install tensorboard), "
                    "or set logging.tensorboard: false"
                ) from None
            self.tensorboard = SummaryWriter(log_dir=str(Path(cfg.output_dir) / "tensorboard"))
        if lc.wandb_project:
            try:
                import wandb
            except ImportError:
                raise ConfigError(
                    f"logging.wandb_project={lc.wandb_project!r} needs the 'wandb' package (pip install wandb), "
                    "or set logging.wandb_project: null"
                ) from None
            # wandb reads WANDB_API_KEY (or its own login) itself; the key never passes through here.
            self.wandb = wandb.init(
                project=lc.wandb_project, entity=lc.wandb_entity, name=self.run_name,
                config=cfg.model_dump(mode="json", by_alias=True), dir=str(cfg.output_dir), resume="allow",
            )
        if lc.ray_metrics:
            self.ray = self._guard("ray metrics", lambda: _RayMetrics(self.run_name, cfg.algorithm.name))

    def _guard(self, sink: str, call: Any) -> Any:
        """Run one sink's call; on failure log once and switch that sink off (training goes on)."""
        if sink in self._failed:
            return None
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - metrics must never stop training
            log.warning("%s disabled after an error: %r", sink, exc)
            self._failed.add(sink)
            return None

    def watch_rollout(self, workers: Sequence[Any], names: Sequence[str] | None = None) -> None:
        """Sample every worker's in-flight samples every `logging.in_flight_poll_s` s in a daemon thread."""
        interval = self.cfg.logging.in_flight_poll_s
        if self.ray is None or interval <= 0 or not workers:
            return
        names = list(names or [f"rollout-{i}" for i in range(len(workers))])
        self._thread = threading.Thread(
            target=self._poll, args=(list(workers), names, interval), name="telemetry-in-flight", daemon=True
        )
        self._thread.start()

    def _poll(self, workers: list[Any], names: list[str], interval: float) -> None:
        import ray

        while not self._stop.is_set():
            try:
                loads = ray.get([w.load.remote() for w in workers], timeout=max(interval, 5.0))
                self.record_in_flight(dict(zip(names, loads, strict=True)))
            except Exception as exc:  # noqa: BLE001 - a worker being replaced or shut down; try again later
                log.debug("in-flight sample failed: %r", exc)
            self._stop.wait(interval)

    def record_in_flight(self, in_flight: dict[str, float]) -> None:
        """Set the in-flight gauge of each named rollout worker."""
        if self.ray is not None:
            self._guard("ray metrics", lambda: [self.ray.set_in_flight(k, float(v)) for k, v in in_flight.items()])

    def record(self, row: dict[str, Any], in_flight: dict[str, float] | None = None) -> None:
        """One step's metrics row (as written to metrics.jsonl) to every enabled sink."""
        step = int(row.get("step", 0))
        if self.ray is not None:
            self._guard("ray metrics", lambda: self.ray.record(row, self.cfg.samples_per_step))
        if in_flight:
            self.record_in_flight(in_flight)
        numeric = {k: v for k, v in ((k, _finite(v)) for k, v in row.items()) if v is not None}
        if self.tensorboard is not None:
            def tb() -> None:
                for key, value in numeric.items():
                    self.tensorboard.add_scalar(key, value, step)
                self.tensorboard.flush()

            self._guard("tensorboard", tb)
        if self.wandb is not None:
            self._guard("wandb", lambda: self.wandb.log(numeric, step=step))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.tensorboard is not None:
            self._guard("tensorboard", self.tensorboard.close)
        if self.wandb is not None:
            self._guard("wandb", self.wandb.finish)

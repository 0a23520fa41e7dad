"""Helpers for end-to-end job tests: run a shipped config with overrides, read its metrics."""

from __future__ import annotations

from pathlib import Path

from rayrlhf.config import load_config
from rayrlhf.launch.run import run_job
from rayrlhf.orchestrator.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def train(config: str, tmp: Path, name: str, *overrides: str, resume: bool = False) -> list[dict]:
    """Run `config` (relative to the repository) into tmp/name and return its metrics rows."""
    cfg = load_config(ROOT / config, [f"output_dir={tmp / name}", "ray.include_dashboard=false", *overrides])
    run_job(cfg, resume=resume)
    return read_metrics(tmp / name / "metrics.jsonl")

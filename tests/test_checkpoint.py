"""Checkpoints are complete or absent; `latest` moves last; RNG state round-trips; old ones are pruned."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from rayrlhf.orchestrator.checkpoint import latest_checkpoint, load_state, save_checkpoint
from rayrlhf.orchestrator.metrics import MetricsWriter, read_metrics
from rayrlhf.orchestrator.rollout import RolloutTimings


def write_trainer(folder: Path) -> None:
    (folder / "policy").mkdir()
    (folder / "policy" / "weights.bin").write_bytes(b"x" * 10)


def test_save_then_load_restores_state_and_rng(tmp_path: Path) -> None:
    random.seed(1)
    torch.manual_seed(1)
    save_checkpoint(tmp_path, 2, {"step": 2, "data": {"epoch": 0, "index": 8}}, write_trainer, keep_last=2)
    expected = (random.random(), torch.rand(3))
    random.seed(99)
    torch.manual_seed(99)
    folder = latest_checkpoint(tmp_path)
    assert folder == tmp_path / "step_2" and (folder / "policy" / "weights.bin").is_file()
    state = load_state(folder)
    assert state == {"step": 2, "data": {"epoch": 0, "index": 8}}
    assert random.random() == expected[0]
    assert torch.equal(torch.rand(3), expected[1])


def test_a_crash_mid_save_leaves_the_previous_checkpoint_latest(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, {"step": 1}, write_trainer, keep_last=3)

    def crash(folder: Path) -> None:
        write_trainer(folder)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, 2, {"step": 2}, crash, keep_last=3)
    assert latest_checkpoint(tmp_path) == tmp_path / "step_1"
    assert not (tmp_path / "step_2").exists()


def test_old_checkpoints_are_pruned(tmp_path: Path) -> None:
    for step in (1, 2, 3, 10):
        save_checkpoint(tmp_path, step, {"step": step}, write_trainer, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_10", "step_3"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_10"


def test_no_checkpoint(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None


def test_metrics_resume_drops_rows_after_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path)
    for step in (1, 2, 3):
        writer.write({"step": step, "reward/mean": float(step), "bad": float("nan")})
    writer.close()
    assert read_metrics(path)[0]["bad"] is None
    MetricsWriter(path, resume_from_step=2).close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    MetricsWriter(path).close()  # a fresh (non-resumed) run starts a new file
    assert read_metrics(path) == []


def test_overlap_fraction() -> None:
    t = RolloutTimings(gen_start=0.0, gen_end=10.0, score_intervals=[(2.0, 4.0), (9.0, 13.0)])
    assert t.score_s == 6.0
    assert t.overlap_frac == pytest.approx((2.0 + 1.0) / 6.0)

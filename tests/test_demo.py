"""`rayrlhf demo` end to end, shortened: SFT -> reward model -> PPO on real Ray, DeepSpeed and vLLM.

The pipeline runs once for the module; the tests read its outputs. The SFT and reward-model
stages are ordinary `rayrlhf train` jobs (algorithm.name sft / rm), so these tests also cover
SFT lowering the held-out NLL and the reward model's held-out accuracy and HF export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from rayrlhf.data.datasets import format_prompt, load_rows
from rayrlhf.launch.cli import build_parser
from rayrlhf.launch.demo import DemoSettings
from rayrlhf.orchestrator.metrics import read_metrics

pytestmark = pytest.mark.slow

# The CI setting: fewer steps and held-out prompts than `rayrlhf demo`'s defaults.
SHORT = DemoSettings(sft_steps=150, rm_steps=200, ppo_steps=20, n_eval=100)


@pytest.fixture(scope="module")
def demo(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    from rayrlhf.launch.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, SHORT)


def test_ppo_against_the_learned_reward_beats_sft_on_the_rule(demo: tuple[Path, dict[str, Any]]) -> None:
    out, summary = demo
    assert summary["true_score/before_sft"] < 0 < summary["true_score/after_sft"]
    assert summary["true_score/after_ppo"] > summary["true_score/after_sft"]
    assert summary["rm_score/after_ppo"] > summary["rm_score/after_sft"]
    assert 0 < summary["kl/ppo_to_sft"] < 5
    written = (out / "summary.json").read_text()
    for key in ("true_score/before_sft", "true_score/after_sft", "true_score/after_ppo", "rm/eval_accuracy", "kl/ppo_to_sft"):
        assert f'"{key}"' in written


def test_sft_lowers_the_heldout_nll(demo: tuple[Path, dict[str, Any]]) -> None:
    out, summary = demo
    evals = [r for r in read_metrics(out / "sft" / "metrics.jsonl") if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, SHORT.sft_steps]
    assert evals[-1]["eval/loss"] < 0.3 < 3.0 < evals[0]["eval/loss"]
    assert summary["sft/eval_loss_after"] == evals[-1]["eval/loss"]


def test_reward_model_is_accurate_and_loads_as_a_sequence_classifier(demo: tuple[Path, dict[str, Any]]) -> None:
    from transformers import AutoModelForSequenceClassification

    from rayrlhf.models.loading import load_tokenizer

    out, summary = demo
    assert summary["rm/eval_accuracy"] >= 0.9
    rows = read_metrics(out / "rm" / "metrics.jsonl")
    assert rows[0]["step"] == 0 and rows[-1]["eval/accuracy"] == summary["rm/eval_accuracy"]
    assert rows[-1]["eval/margin"] > rows[0]["eval/margin"]
    # Plain transformers, pooling at the last non-pad token, ranks the held-out pairs as the trainer did.
    rm = AutoModelForSequenceClassification.from_pretrained(out / "rm" / "final").eval()
    tok = load_tokenizer(out / "rm" / "final")
    pairs = load_rows(str(out / "data" / "sort_pairs_eval.jsonl"), "pairs")
    scores = {}
    for side in ("chosen", "rejected"):
        texts = [format_prompt(tok, p["prompt"], True) + p[side] + tok.eos_token for p in pairs]
        with torch.no_grad():
            scores[side] = rm(**tok(texts, add_special_tokens=False, return_tensors="pt", padding=True)).logits[:, 0]
    accuracy = float((scores["chosen"] > scores["rejected"]).float().mean())
    assert accuracy == pytest.approx(summary["rm/eval_accuracy"], abs=0.02)


def test_every_stage_follows_the_output_contract(demo: tuple[Path, dict[str, Any]]) -> None:
    out, _ = demo
    for stage in ("sft", "rm", "ppo"):
        assert (out / stage / "config.yaml").is_file()
        assert (out / stage / "report.html").read_text().count("<svg") >= 2  # `rayrlhf report` after each stage
        assert (out / stage / "final" / "config.json").is_file()
        rows = read_metrics(out / stage / "metrics.jsonl")
        assert rows[-1]["step"] == getattr(SHORT, f"{stage}_steps")
        assert "timing/step_s" in rows[-1]
    assert read_metrics(out / "ppo" / "metrics.jsonl")[-1]["rollout/backend"] == "vllm"
    assert 'data-pick="best"' in (out / "ppo" / "report.html").read_text()  # PPO's samples/ give transcripts


def test_demo_command_line() -> None:
    args = build_parser().parse_args(["demo", "--output-dir", "x", "--ppo-steps", "3"])
    assert (args.output_dir, args.ppo_steps, args.sft_steps) == ("x", 3, None)

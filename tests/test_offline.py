"""Offline algorithms through `rayrlhf train`: data checks, DPO on real Ray + DeepSpeed with a resume,
and the demo task's data. SFT and the reward model are exercised end to end by tests/test_demo.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rayrlhf.config import load_config
from rayrlhf.data.demo_data import WRITING_SLIPS, comparisons, demonstrations, slip, write_task_data
from rayrlhf.data.examples import load_examples
from rayrlhf.errors import InvalidInput
from rayrlhf.models.tiny import build_tokenizer
from rayrlhf.orchestrator.metrics import read_metrics
from rayrlhf.rewards.tasks import sort_score

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "cluster_configs" / "local-cpu"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------ data, no Ray
def test_comparisons_are_ranked_by_the_rule_and_demonstrations_slip_at_the_set_rate() -> None:
    pairs = comparisons(300, seed=1)
    assert all(sort_score(p["chosen"], "".join(sorted(p["prompt"].split(": ")[1]))) == 1.0 for p in pairs)
    assert all(sort_score(p["rejected"], p["chosen"]) < 1.0 for p in pairs)
    demos = demonstrations(1000, seed=2, noise=0.2)
    slipped = sum(d["response"] != d["answer"] for d in demos) / len(demos)
    assert 0.15 < slipped < 0.25
    import random

    rng = random.Random(0)
    assert all(slip("abc", rng, WRITING_SLIPS) != "abc" for _ in range(100))


def test_examples_follow_the_chat_template_and_end_with_eos(tmp_path: Path) -> None:
    tok = build_tokenizer()
    data = load_config(None, ["algorithm.name=sft", "data.max_prompt_tokens=16"]).data
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "sort: ba", "response": "ab"}, {"prompt": "x" * 30, "response": "y"}])
    with pytest.raises(InvalidInput, match=r"sft\.jsonl, line 2: the prompt is 37 tokens, over data\.max_prompt_tokens = 16"):
        load_examples(str(path), "sft", tok, data)
    [ex], dropped = load_examples(str(path), "sft", tok, data.model_copy(update={"overlong_prompts": "drop"}))
    assert dropped == 1
    assert tok.decode(ex.prompt_ids) == "U: sort: ba\nA: "
    assert ex.responses[0] == tok("ab", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"},
                                               {"prompt": "p", "chosen": "a", "rejected": "b"}])
    examples, ties = load_examples(str(pairs), "pairs", tok, data)
    assert ties == 1 and len(examples) == 1 and len(examples[0].responses) == 2


def bad_pairs(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "sort: ba", "chosen": "ab", "rejected": "ba"},
        {"prompt": "sort: cb", "chosen": "bc", "rejected": "cb"},
        {"prompt": "sort: dc", "chosen": "cd"},
    ])


def test_a_bad_row_exits_2_naming_file_and_line(tmp_path: Path) -> None:
    """The real command (rm config): exit status 2 and a one-line message, before any actor starts."""
    bad = bad_pairs(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "rayrlhf.launch.cli", "train", str(CONFIGS / "rm.yaml"),
         "--set", f"data.train={bad}", "--set", f"output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{bad}, line 3: missing field 'rejected'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_bad_eval_row_of_a_dpo_job_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rayrlhf.launch.cli import main

    bad = bad_pairs(tmp_path)
    assert main(["train", str(CONFIGS / "dpo.yaml"), "--set", f"data.eval={bad}", "--set", f"output_dir={tmp_path}"]) == 2
    assert f"{bad}, line 3: missing field 'rejected'" in capsys.readouterr().err


def test_the_shipped_data_is_what_the_generator_writes(tmp_path: Path) -> None:
    write_task_data(tmp_path, with_prompts=False)
    for name in ("sort_sft_train", "sort_sft_eval", "sort_pairs_train", "sort_pairs_eval"):
        assert (tmp_path / f"{name}.jsonl").read_text() == (CONFIGS / "data" / f"{name}.jsonl").read_text(), name


# ------------------------------------------------------------------------ DPO on Ray, resumed
@pytest.mark.slow
def test_dpo_raises_heldout_accuracy_and_margin_and_resumes(tmp_path: Path, tiny_model: Path, ray_local: None) -> None:
    from transformers import AutoModelForCausalLM

    from rayrlhf.launch.run import run_job

    reference = tmp_path / "reference"  # same weights, other path: the ReferenceServer computes the reference
    shutil.copytree(tiny_model, reference)
    out = tmp_path / "dpo"
    common = [f"output_dir={out}", f"model.policy={tiny_model}", f"model.reference={reference}",
              "schedule.eval_every=20", "checkpoint.every=20", "trainer.policy.num_ranks=2",
              "trainer.micro_batch_size=16", "servers.micro_batch_size=256"]
    run_job(load_config(CONFIGS / "dpo.yaml", [*common, "schedule.steps=20"]))
    first = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in first] == list(range(21))
    assert abs(first[0]["eval/margin"]) < 1e-4  # policy == reference before the first update
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_20"

    run_job(load_config(CONFIGS / "dpo.yaml", [*common, "schedule.steps=40"]), resume=True)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(41))  # one uninterrupted history
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[-1]["eval/accuracy"] >= 0.7 > evals[0]["eval/accuracy"]
    assert evals[-1]["eval/margin"] > evals[1]["eval/margin"] > 0
    assert all(r["train/loss"] > 0 and r["timing/step_s"] > 0 for r in rows[1:])
    assert (out / "config.yaml").is_file()
    AutoModelForCausalLM.from_pretrained(out / "final")  # the policy loads with transformers

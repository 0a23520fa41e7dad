"""`rayrlhf eval`: a saved policy evaluated outside training gives the figures the run logged for that step.

One tiny GRPO run (3 steps, a checkpoint at step 2, evaluations at steps 0, 2 and 3, greedy and 2 seeded samples
per prompt) is evaluated again from its output_dir (final/) and from its step-2 checkpoint (a DeepSpeed checkpoint,
exported first); then, as a plain model folder with --config, on another data file. Bad input exits 2 before
Ray starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from jobs import ROOT, train

from rayrlhf.launch.cli import main

CONFIG = "cluster_configs/local-cpu/grpo.yaml"
EVAL = ("schedule.eval_every=2", "schedule.eval_decoding=both", "schedule.eval_samples=2", "schedule.eval_pass_k=[1,2]",
        "schedule.eval_max_prompts=6", "schedule.eval_subset_seed=5", "schedule.eval_max_new_tokens=6",
        "schedule.eval_pass_threshold=0.2")
SETTINGS = ("schedule.steps=3", "checkpoint.every=2", "checkpoint.keep_last=3", "schedule.prompts_per_step=4",
            "algorithm.group_size=4", "reward.function=rayrlhf.rewards.tasks:alphabet_reward", *EVAL)


def _eval(capsys: pytest.CaptureFixture, *args: str) -> dict:
    assert main(["eval", *args]) == 0
    printed = capsys.readouterr().out
    written = Path(printed.strip().splitlines()[-1].removeprefix("written to "))
    result = json.loads(written.read_text())
    assert "reward_mean" in printed and "pass@2" in printed
    return result


def _same(result: dict, row: dict) -> None:
    logged = {k: v for k, v in row.items() if k.startswith("eval/")}
    got = {k: v for k, v in result["metrics"].items() if k.startswith("eval/")}
    assert sorted(got) == sorted(logged)
    for key, value in logged.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_eval_reproduces_the_runs_evaluations(ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = train(CONFIG, tmp_path, "run", *SETTINGS)
    run = tmp_path / "run"
    by_step = {r["step"]: r for r in rows if "eval/greedy/reward_mean" in r}
    assert sorted(by_step) == [0, 2, 3]
    assert by_step[3]["eval/greedy/reward_mean"] != by_step[0]["eval/greedy/reward_mean"]  # the policy changed
    data = str(ROOT / "cluster_configs/local-cpu/data/sort_eval.jsonl")

    final = _eval(capsys, str(run), "--data", data)
    assert final["step"] == 3 and final["prompts"] == 6 and final["policy"] == str(run / "final")
    assert (run / "eval" / "final-sort_eval.json").is_file()
    _same(final, by_step[3])

    mid = _eval(capsys, str(run / "checkpoints" / "step_2"), "--data", data)
    assert mid["step"] == 2
    _same(mid, by_step[2])
    assert not [p for p in (run / "eval").iterdir() if p.name.startswith(".policy-")]  # the export was removed

    model = tmp_path / "plain-model"
    shutil.copytree(run / "final", model)
    assert main(["eval", str(model), "--data", data]) == 2  # no run around it, no --config
    assert "--config" in capsys.readouterr().err
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"prompt": f"sort: {w}", "answer": "".join(sorted(w))}) + "\n"
                             for w in ("dcba", "hgf", "pon", "mlk", "bca")))
    result = _eval(capsys, str(model), "--data", str(other), "--config", str(ROOT / CONFIG), "--output",
                   str(tmp_path / "p.json"), *[a for s in (*SETTINGS, "schedule.eval_samples=3", "schedule.eval_pass_k=[1,2,3]",
                                                           "schedule.eval_max_prompts=null") for a in ("--set", s)])
    assert result["policy"] == str(model) and result["step"] == 0
    assert result["prompts"] == 5 and result["metrics"]["eval/sampled/samples"] == 15
    assert result["metrics"]["eval/greedy/samples"] == 5
    assert 0 <= result["metrics"]["eval/sampled/pass@1"] <= result["metrics"]["eval/sampled/pass@3"] <= 1


def test_eval_merges_a_lora_runs_adapter(ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A LoRA run's final/ holds only the adapter: it is merged into the base for the engines, and the figures are
    the ones the run logged at its last step."""
    rows = train(CONFIG, tmp_path, "lora", "schedule.steps=1", "schedule.prompts_per_step=4", "algorithm.group_size=4",
                 "reward.function=rayrlhf.rewards.tasks:alphabet_reward", "schedule.eval_max_prompts=6",
                 "schedule.eval_max_new_tokens=6", "model.lora.rank=8", "model.lora.alpha=16", "trainer.policy.lr=5e-2")
    assert (tmp_path / "lora/final/adapter_config.json").is_file()
    last = [r for r in rows if r["step"] == 1 and "eval/reward_mean" in r][0]
    assert last["eval/reward_mean"] != rows[0]["eval/reward_mean"]  # the adapter changed what the policy says
    assert main(["eval", str(tmp_path / "lora"), "--data", str(ROOT / "cluster_configs/local-cpu/data/sort_eval.jsonl")]) == 0
    printed = capsys.readouterr().out
    result = json.loads(Path(printed.strip().splitlines()[-1].removeprefix("written to ")).read_text())
    _same(result, last)

"""Mistakes in an online job are found before any actor starts, naming the key, file or line (no Ray here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rayrlhf.config import load_config
from rayrlhf.errors import InvalidInput
from rayrlhf.models.architectures import build_architecture
from rayrlhf.orchestrator.preflight import preflight

ROOT = Path(__file__).resolve().parents[1]
GRPO = ROOT / "cluster_configs" / "local-cpu" / "grpo.yaml"
PPO = ROOT / "cluster_configs" / "local-cpu" / "ppo.yaml"


def cfg(tmp_path: Path, *overrides: str, path: Path = GRPO):
    return load_config(path, [f"output_dir={tmp_path / 'out'}", *overrides])


def test_a_good_job_passes_and_hands_over_what_it_loaded(tmp_path: Path) -> None:
    checked = preflight(cfg(tmp_path))
    assert len(checked.train) == 2000 and checked.eval is not None and len(checked.eval) == 200
    assert checked.tokenizer.eos_token_id is not None and Path(checked.policy, "config.json").is_file()


@pytest.mark.parametrize(("overrides", "message"), [
    (["reward.function=rayrlhf.rewards.tasks:sort_rewardx"], "has no function 'sort_rewardx'"),
    (["reward.function=rayrlhf.rewards.tasks:sort_score"], r"column\(s\) \['answer'\] would arrive as keyword arguments"),
    (["model.policy=/no/such/model"], "model.policy: cannot load a model config from '/no/such/model'"),
    (["data.train=/no/such/prompts.jsonl"], "/no/such/prompts.jsonl: data file does not exist"),
    (["data.eval=/no/such/eval.jsonl"], "/no/such/eval.jsonl: data file does not exist"),
    (["reward.eval_function=rayrlhf.rewards.tasks:nope"], "reward.eval_function 'rayrlhf.rewards.tasks:nope': .*has no function"),
    (["reward.function=null", "reward.functions=[{function: rayrlhf.rewards.tasks:sort_reward}, "
      "{function: rayrlhf.rewards.tasks:nope}]"], r"reward\.functions\[1\]\.function 'rayrlhf\.rewards\.tasks:nope'"),
    (["reward.function=null", "reward.functions=[{function: rayrlhf.rewards.tasks:sort_score}]"],
     r"reward\.functions\[0\]\.function .* would arrive as keyword arguments"),
])
def test_mistakes_are_named_before_any_actor(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        preflight(cfg(tmp_path, *overrides))


def test_weighted_reward_functions_that_fit_the_data_pass(tmp_path: Path) -> None:
    checked = preflight(cfg(tmp_path, "reward.function=null", "reward.functions=[{function: rayrlhf.rewards.tasks:sort_reward}, "
                            "{function: rayrlhf.rewards.tasks:alphabet_reward, weight: 0.1}]"))
    assert len(checked.train) == 2000


def test_a_reward_function_missing_a_column_is_named(tmp_path: Path) -> None:
    (tmp_path / "needs.py").write_text("def reward(prompts, responses, solution, **_):\n    return [0.0] * len(prompts)\n")
    with pytest.raises(InvalidInput, match=r"needs the column\(s\) \['solution'\], which data.train does not have"):
        preflight(cfg(tmp_path, f"reward.function={tmp_path / 'needs.py'}:reward"))


def test_a_critic_with_another_tokenizer_is_refused(tmp_path: Path) -> None:
    from rayrlhf.models.tiny import build_tokenizer

    critic = build_architecture("llama", tmp_path / "critic")
    other = build_tokenizer(charset="zyxwvutsrqponmlkjihgfedcba :\n")
    other.save_pretrained(critic)  # same architecture, another vocabulary
    with pytest.raises(InvalidInput, match="model.critic .* has another tokenizer than model.policy"):
        preflight(cfg(tmp_path, f"model.critic={critic}", path=PPO))


def test_the_command_exits_2_before_ray_starts(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "rayrlhf.launch.cli", "train", str(GRPO), "--set", f"output_dir={tmp_path}",
         "--set", "reward.function=rayrlhf.rewards.tasks:sort_rewardx"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={"PATH": "/usr/bin:/bin", "RAY_ADDRESS": ""},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "reward.function 'rayrlhf.rewards.tasks:sort_rewardx'" in proc.stderr and "Traceback" not in proc.stderr
    assert "embedded local Ray" not in proc.stderr and not (tmp_path / "config.yaml").exists()  # nothing started

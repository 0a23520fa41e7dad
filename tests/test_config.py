"""Config loading, overrides, cross-field checks and the `rayrlhf validate` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rayrlhf.config import ConfigError, JobConfig, load_config, parse_override, to_yaml
from rayrlhf.launch.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "cluster_configs").rglob("*.yaml"))
JOB_CONFIGS = [p for p in SHIPPED if yaml.safe_load(p.read_text()).get("algorithm")]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


GRPO = """\
algorithm:
  name: grpo
  group_size: 4
reward:
  function: rayrlhf.rewards.tasks:sort_reward
data:
  train: prompts.jsonl
"""


def test_every_key_has_a_default_and_a_description() -> None:
    def walk(model: type, prefix: str) -> None:
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            assert not field.is_required(), f"{prefix}{name} has no default"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")

    walk(JobConfig, "")


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_configs_validate(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.output_dir


def test_overrides_coerce_types(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, GRPO),
        ["algorithm.kl_coef=0.05", "schedule.steps=7", "trainer.bf16=true", "model.reference=null",
         "rollout.backend=hf", "algorithm.group_size=2"],
    )
    assert cfg.algorithm.kl_coef == 0.05 and isinstance(cfg.schedule.steps, int) and cfg.schedule.steps == 7
    assert cfg.trainer.bf16 is True and cfg.model.reference is None
    assert cfg.rollout.backend == "hf" and cfg.algorithm.group_size == 2


def test_override_of_a_nested_section(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GRPO), ["trainer.policy.lr=3e-4", "trainer.policy.num_ranks=2"])
    assert cfg.trainer.policy.lr == pytest.approx(3e-4)
    assert cfg.trainer.policy.num_ranks == 2
    assert cfg.trainer.critic.num_ranks == 1


def test_unknown_key_names_key_file_line_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "seed: 1\nalgorithm:\n  name: rloo\n  group_size: 2\n  kl_coeff: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "algorithm.kl_coeff: unknown key" in msg
    assert "did you mean 'kl_coef'" in msg
    assert f"{path}, line 5" in msg


def test_unknown_override_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"rollout\.num_worker: unknown key .*num_workers.*\[--set\]"):
        load_config(write(tmp_path, GRPO), ["rollout.num_worker=2"])


def test_bad_value_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"algorithm\.kl_estimator: .*'k1', 'k2' or 'k3'"):
        load_config(write(tmp_path, GRPO), ["algorithm.kl_estimator=k4"])
    with pytest.raises(ConfigError, match=r"schedule\.steps: .*greater than or equal to 1"):
        load_config(write(tmp_path, GRPO), ["schedule.steps=0"])


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["algorithm.name=ppo"], r"ppo needs a critic: set model\.critic"),
        (["algorithm.group_size=1"], r"grpo needs algorithm\.group_size >= 2"),
        (["algorithm.ptx_coef=27.8"], r"needs data\.pretrain"),
        (["reward.function=null"], r"exactly one reward source"),
        (["model.reward=some/rm"], r"exactly one reward source: .*\(got model\.reward and reward\.function\)"),
        (["reward.functions=[{function: m:f}]"], r"\(got reward\.function and reward\.functions\)"),
        (["algorithm.overlong_buffer=64"], r"overlong_buffer = 64 must be smaller than rollout\.max_new_tokens = 64"),
        (["algorithm.policy_loss=gspo", "algorithm.name=reinforce_pp"], r"policy_loss=gspo .* use policy_loss gspo_token"),
        (["schedule.prompts_per_step=3", "trainer.mini_batch_size=8"], r"= 12 must be divisible by trainer\.mini_batch_size = 8"),
        (["trainer.policy.num_ranks=3"], r"must split evenly over trainer\.policy\.num_ranks = 3"),
        (["algorithm.name=ppo", "model.critic=x", "trainer.critic.num_ranks=5"], r"trainer\.critic\.num_ranks = 5"),
    ],
)
def test_cross_field_checks(tmp_path: Path, overrides: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(write(tmp_path, GRPO), overrides)


def test_offline_algorithms_need_no_reward(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "algorithm:\n  name: dpo\n"))
    assert not cfg.algorithm.is_online


def test_kl_placement_defaults() -> None:
    base = ["algorithm.group_size=2", "reward.function=m:f", "data.train=p.jsonl"]
    assert load_config(None, ["algorithm.name=grpo", *base]).algorithm.kl_as_reward is False
    assert load_config(None, ["algorithm.name=rloo", *base]).algorithm.kl_as_reward is True


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"job\.yaml, line 2: not valid YAML"):
        load_config(write(tmp_path, "seed: 1\nmodel: policy: x\n"))


@pytest.mark.parametrize("item", ["novalue", "=3"])
def test_malformed_override(item: str) -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override(item)


def test_override_into_a_value_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="seed is a value, not a section"):
        load_config(write(tmp_path, GRPO), ["seed.x=1"])


def test_validate_prints_the_resolved_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(write(tmp_path, GRPO)), "--set", "schedule.steps=3"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["schedule"]["steps"] == 3
    assert resolved["rollout"]["max_new_tokens"] == 64  # a default, filled in
    assert JobConfig.model_validate(resolved).algorithm.name == "grpo"


def test_validate_cli_exits_2_naming_the_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path, GRPO + "rollout:\n  temprature: 0.7\n")
    proc = subprocess.run(
        [sys.executable, "-m", "rayrlhf.launch.cli", "validate", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "rollout.temprature: unknown key (did you mean 'temperature'?)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_file_exits_2(tmp_path: Path) -> None:
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2


def test_defaults_that_make_rl_right() -> None:
    base = ["data.train=prompts.jsonl", "reward.function=rayrlhf.rewards.tasks:sort_reward"]
    grpo = load_config(None, base).algorithm
    assert (grpo.kl_estimator, grpo.group_size, grpo.kl_as_reward) == ("k3", 8, False)  # KL as a loss term: k3
    ppo = load_config(None, [*base, "algorithm.name=ppo", "model.critic=tiny"]).algorithm
    assert (ppo.kl_estimator, ppo.group_size, ppo.kl_as_reward) == ("k1", 1, True)  # KL as a reward penalty: k1
    with pytest.raises(ConfigError, match="kl_estimator=k1 with the KL as a loss term .* gradient is zero in expectation"):
        load_config(None, [*base, "algorithm.kl_estimator=k1"])
    assert load_config(None, [*base, "schedule.steps=200"]).checkpoint.every == 20  # checkpoints by default
    assert load_config(None, [*base, "checkpoint.every=0"]).checkpoint.every == 0
    with pytest.raises(ConfigError, match="algorithm.name=grpo needs data.train"):
        load_config(None, ["reward.function=rayrlhf.rewards.tasks:sort_reward"])


@pytest.mark.parametrize("url", ["https://user:pw@rm.example/score", "https://rm.example/score?api_key=abc",
                                 "https://rm.example/score?token=abc&x=1"])
def test_credentials_in_the_reward_url_are_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="reward.url carries credentials .* reward.auth_token_env"):
        load_config(None, ["data.train=p.jsonl", f"reward.url={url}"])
    assert load_config(None, ["data.train=p.jsonl", "reward.url=https://rm.example/score?model=v2",
                              "reward.auth_token_env=RM_TOKEN"]).reward.auth_token_env == "RM_TOKEN"


def test_gspo_gets_its_own_clip_ranges_and_sequence_mean(caplog: pytest.LogCaptureFixture) -> None:
    base = ["data.train=p.jsonl", "reward.function=m:f"]
    ppo = load_config(None, base).algorithm
    assert (ppo.policy_loss, ppo.clip_eps, ppo.clip_eps_high, ppo.loss_agg) == ("ppo", 0.2, None, "token-mean")
    gspo = load_config(None, [*base, "algorithm.policy_loss=gspo"]).algorithm
    assert (gspo.clip_eps, gspo.clip_eps_high, gspo.loss_agg) == (3e-4, 4e-4, "seq-mean-token-mean")
    mine = load_config(None, [*base, "algorithm.policy_loss=gspo", "algorithm.clip_eps=1e-3", "algorithm.loss_agg=token-mean"])
    assert (mine.algorithm.clip_eps, mine.algorithm.clip_eps_high, mine.algorithm.loss_agg) == (1e-3, None, "token-mean")
    token = load_config(None, ["algorithm.name=ppo", "model.critic=tiny", *base, "algorithm.policy_loss=gspo_token"])
    assert token.algorithm.loss_agg == "token-mean"  # GSPO-token: per-token advantages, per-token mean
    assert load_config(None, [*base, "algorithm.name=rloo", "algorithm.policy_loss=gspo"]).algorithm.clip_eps == 3e-4
    assert not [r for r in caplog.records if "GSPO" in r.getMessage()]
    load_config(None, [*base, "algorithm.policy_loss=gspo", "algorithm.clip_eps=0.2"])  # a PPO-size range: warned
    assert any("clip range of 0.2" in r.getMessage() and "3e-4" in r.getMessage() for r in caplog.records)
    job = load_config(None, [*base, "algorithm.policy_loss=gspo"])
    assert JobConfig.model_validate(yaml.safe_load(to_yaml(job))).algorithm == job.algorithm  # config.yaml reloads the same


WEIGHTED = """\
algorithm:
  name: grpo
  group_size: 4
reward:
  functions:
    - function: rayrlhf.rewards.math:accuracy
    - function: rayrlhf.rewards.math:format
      weight: 0.1
    - {function: my_rewards.py:format, weight: -0.5, name: format_strict}
data:
  train: prompts.jsonl
"""


def test_weighted_reward_functions(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, WEIGHTED))
    parts = cfg.reward.functions
    assert [(p.name, p.weight) for p in parts] == [("accuracy", 1.0), ("format", 0.1), ("format_strict", -0.5)]
    assert cfg.reward.function is None
    with pytest.raises(ConfigError, match=r"reward\.functions\[1\] and reward\.functions\[2\] are both named 'format'"):
        load_config(write(tmp_path, WEIGHTED.replace(", name: format_strict", "")))
    with pytest.raises(ConfigError, match=r"name 'mean' would collide with the metric reward/mean"):
        load_config(write(tmp_path, WEIGHTED.replace("format_strict", "mean")))
    with pytest.raises(ConfigError, match=r"name 'a/b': a metric name takes"):
        load_config(write(tmp_path, WEIGHTED.replace("format_strict", "a/b")))
    with pytest.raises(ConfigError, match=r"reward\.functions\.0\.wieght: unknown key"):
        load_config(write(tmp_path, WEIGHTED), ["reward.functions=[{function: m:f, wieght: 2}]"])
    with pytest.raises(ConfigError, match=r"reward\.functions\.0\.function: .*required"):
        load_config(write(tmp_path, WEIGHTED), ["reward.functions=[{weight: 2}]"])
    with pytest.raises(ConfigError, match=r"reward\.functions: .*at least 1 item"):
        load_config(write(tmp_path, WEIGHTED), ["reward.functions=[]"])
    with pytest.raises(ConfigError, match=r"reward\.functions\.0\.weight"):
        load_config(write(tmp_path, WEIGHTED), ["reward.functions=[{function: m:f, weight: .inf}]"])


def test_overlong_and_evaluation_sampling_keys(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GRPO), ["algorithm.overlong_filter=true", "algorithm.overlong_buffer=16",
                                              "algorithm.overlong_penalty_factor=0.5"])
    assert (cfg.algorithm.overlong_filter, cfg.algorithm.overlong_buffer, cfg.algorithm.overlong_penalty_factor) == (True, 16, 0.5)
    s = load_config(write(tmp_path, GRPO)).schedule
    assert (s.eval_samples, s.eval_pass_k, s.eval_max_new_tokens, s.eval_subset_seed) == (1, [1], None, None)
    s = load_config(write(tmp_path, GRPO), ["schedule.eval_samples=8", "schedule.eval_pass_k=[8, 1, 4, 1]",
                                            "schedule.eval_decoding=sampled", "schedule.eval_max_new_tokens=512"]).schedule
    assert (s.eval_samples, s.eval_pass_k, s.eval_max_new_tokens) == (8, [1, 4, 8], 512)
    with pytest.raises(ConfigError, match=r"eval_pass_k \[16\] exceed schedule\.eval_samples = 8"):
        load_config(write(tmp_path, GRPO), ["schedule.eval_samples=8", "schedule.eval_pass_k=[1, 16]",
                                            "schedule.eval_decoding=both"])
    with pytest.raises(ConfigError, match=r"eval_samples = 4 with schedule\.eval_decoding=greedy"):
        load_config(write(tmp_path, GRPO), ["schedule.eval_samples=4"])
    with pytest.raises(ConfigError, match=r"schedule\.eval_pass_k\.0"):
        load_config(write(tmp_path, GRPO), ["schedule.eval_pass_k=[0]"])


def test_seeded_evaluation_subset_is_fixed_and_spread_over_the_file(tmp_path: Path) -> None:
    from rayrlhf.orchestrator.evaluation import eval_max_new_tokens, eval_prompts

    data = [None] * 100  # eval_prompts reads only the number of prompts
    first = load_config(write(tmp_path, GRPO), ["schedule.eval_max_prompts=10"])
    assert eval_prompts(data, first) == list(range(10))
    seeded = load_config(write(tmp_path, GRPO), ["schedule.eval_max_prompts=10", "schedule.eval_subset_seed=3"])
    picked = eval_prompts(data, seeded)
    assert len(set(picked)) == 10 and picked == sorted(picked) and max(picked) >= 10 and picked == eval_prompts(data, seeded)
    other = load_config(write(tmp_path, GRPO), ["schedule.eval_max_prompts=10", "schedule.eval_subset_seed=4"])
    assert eval_prompts(data, other) != picked
    assert eval_max_new_tokens(first) == 64
    assert eval_max_new_tokens(load_config(write(tmp_path, GRPO), ["schedule.eval_max_new_tokens=9"])) == 9


def test_relative_paths_are_anchored_where_the_job_starts(tmp_path: Path) -> None:
    """Actors run elsewhere on a `ray start` cluster: local paths become absolute, names that are not paths stay."""
    from rayrlhf.config.paths import anchor_paths

    (tmp_path / "r.py").write_text("def fn(prompts, responses, **_):\n    return [0.0] * len(prompts)\n")
    (tmp_path / "train.jsonl").write_text('{"prompt": "a"}\n')
    (tmp_path / "sft").mkdir()
    cfg = load_config(None, ["output_dir=runs/x", "model.policy=sft", "model.reference=Qwen/Qwen2.5-0.5B",
                             "data.train=train.jsonl", "data.eval=gsm8k:main@test", "reward.function=r.py:fn",
                             "reward.eval_function=rayrlhf.rewards.tasks:sort_reward", "env.class=r.py:fn"])
    anchor_paths(cfg, tmp_path)
    assert cfg.output_dir == str(tmp_path / "runs" / "x")  # need not exist yet
    assert cfg.model.policy == str(tmp_path / "sft") and cfg.model.reference == "Qwen/Qwen2.5-0.5B"
    assert cfg.data.train == str(tmp_path / "train.jsonl") and cfg.data.eval == "gsm8k:main@test"
    assert cfg.reward.function == f"{tmp_path / 'r.py'}:fn" and cfg.env.class_ == f"{tmp_path / 'r.py'}:fn"
    assert cfg.reward.eval_function == "rayrlhf.rewards.tasks:sort_reward"
    assert anchor_paths(cfg, tmp_path / "elsewhere").model.policy == str(tmp_path / "sft")  # idempotent

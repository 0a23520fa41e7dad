"""Every shipped job config builds down to the point where it would need GPUs, and the actor plan
refuses combinations the code cannot run, naming the keys (no Ray, no GPU: these run anywhere)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rayrlhf.actors.rollout import _engine_kwargs
from rayrlhf.actors.trainer import deepspeed_config
from rayrlhf.actors.trainer_group import trainer_settings
from rayrlhf.config import ConfigError, load_config
from rayrlhf.orchestrator.plan import check_plan, plan_actors

ROOT = Path(__file__).resolve().parents[1]
JOB_CONFIGS = sorted(p for p in (ROOT / "cluster_configs").rglob("*.yaml") if "algorithm" in yaml.safe_load(p.read_text()))
GPU_2X8 = ROOT / "cluster_configs" / "gpu-2x8"


def test_every_job_config_under_cluster_configs_is_found() -> None:
    names = {str(p.relative_to(ROOT / "cluster_configs")) for p in JOB_CONFIGS}
    assert {"gpu-2x8/ppo.yaml", "gpu-2x8/grpo.yaml", "gpu-1x8/grpo.yaml", "gpu-1x8/dapo.yaml", "local-cpu/grpo.yaml",
            "local-cpu/ppo.yaml", "local-cpu/sft.yaml"} <= names


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "cluster_configs")))
def test_shipped_job_config_constructs(path: Path) -> None:
    """Config, cross-field checks, the actor plan, each rank's DeepSpeed config and each engine's vLLM arguments."""
    from vllm import EngineArgs

    cfg = load_config(path)
    roles = ["policy"] if cfg.algorithm.name != "rm" else ["reward"]
    if cfg.algorithm.name == "ppo":
        roles.append("critic")
    for role in roles:
        settings = trainer_settings(cfg, role, total_steps=cfg.schedule.steps)
        ranks = (cfg.trainer.critic if role == "critic" else cfg.trainer.policy).num_ranks
        ds = deepspeed_config(settings, ranks, bf16=bool(cfg.trainer.bf16))
        assert ds["train_batch_size"] == (settings.micro_batch_size or 1) * settings.gradient_accumulation_steps * ranks
    if not cfg.algorithm.is_online:
        return
    plan = check_plan(cfg)
    assert [a.name for a in plan.of("rollout")] == [f"rollout-{i}" for i in range(cfg.rollout.num_workers)]
    assert len(plan.of("policy")) == cfg.trainer.policy.num_ranks
    kwargs = _engine_kwargs(cfg.rollout.backend, "/models/policy", cfg.rollout, cfg.model, cfg.seed, 1024)
    if cfg.rollout.backend == "vllm":  # the arguments the worker hands vLLM are ones vLLM takes
        kwargs.pop("model_path")
        EngineArgs(model="/models/policy", **{k: v for k, v in kwargs.items() if k in EngineArgs.__dataclass_fields__})
    if path.parent == GPU_2X8:
        assert plan.total_gpus <= 16  # two nodes of eight
        assert cfg.rollout.num_gpus == cfg.rollout.tensor_parallel_size <= 8  # one engine's GPUs on one node
        assert all(a.num_gpus == 1 for a in plan.of("policy"))
        assert Path(cfg.output_dir).is_absolute()  # shared storage, not the job's temporary working dir
        if cfg.rollout.tensor_parallel_size > 1:
            assert "per-shard checksums" in plan.of("rollout")[0].path


@pytest.mark.parametrize("overrides, problem", [
    (["rollout.backend=hf", "rollout.tensor_parallel_size=2"], "rollout.tensor_parallel_size = 2 needs rollout.backend: vllm"),
    (["rollout.num_gpus=1", "rollout.tensor_parallel_size=2"], "rollout.num_gpus = 1 must equal rollout.tensor_parallel_size = 2"),
    (["trainer.policy.num_gpus=0.5"], "trainer.policy.num_gpus = 0.5: a rank needs whole GPUs"),
    (["trainer.policy.num_gpus=1", "servers.weight_sync_backend=collective"], "servers.weight_sync_backend: collective"),
    (["rollout.backend=hf", "model.policy=tiny:qwen3-moe"], "rollout.backend: hf cannot take weight updates"),
    (["trainer.offload=optimizer"], "trainer.offload: optimizer needs trainer.zero_stage >= 1"),
    (["trainer.offload=all", "trainer.zero_stage=2"], "trainer.offload: all needs trainer.zero_stage >= 3"),
    (["servers.colocate=true", "trainer.policy.num_gpus=1", "servers.reference_num_gpus=1"],
     "servers.reference_num_gpus = 1: beside a policy rank a server takes a fraction"),
    (["servers.colocate=true", "servers.reference_num_gpus=0.25"], "servers.colocate: the policy ranks have no GPU"),
    (["servers.colocate=true", "trainer.policy.num_gpus=2", "servers.reference_num_gpus=0.25"],
     "trainer.policy.num_gpus must be 1"),
])
def test_plan_refuses_what_cannot_run(overrides: list[str], problem: str) -> None:
    cfg = load_config(ROOT / "cluster_configs" / "local-cpu" / "grpo.yaml", overrides)
    assert any(problem in p for p in plan_actors(cfg).problems)
    with pytest.raises(ConfigError, match="cannot run as configured"):
        check_plan(cfg)


def test_tensor_parallel_rollout_on_cpu_is_planned_with_per_shard_verification() -> None:
    cfg = load_config(ROOT / "cluster_configs" / "local-cpu" / "grpo.yaml", ["rollout.tensor_parallel_size=2"])
    [worker] = check_plan(cfg).of("rollout")
    assert "tensor parallel 2" in worker.path and "per-shard checksums over 2 ranks" in worker.path


def test_validate_prints_the_plan_and_train_refuses_a_bad_one_before_ray(tmp_path: Path) -> None:
    config = ROOT / "cluster_configs" / "gpu-2x8" / "ppo.yaml"
    out = subprocess.run([sys.executable, "-m", "rayrlhf.launch.cli", "validate", str(config)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "# actor plan:" in out.stdout and "tensor parallel 2" in out.stdout and "16 GPU" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "rayrlhf.launch.cli", "train", str(ROOT / "cluster_configs" / "local-cpu" / "grpo.yaml"),
         "--set", "rollout.backend=hf", "--set", "rollout.tensor_parallel_size=2", "--set", f"output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={"PATH": "/usr/bin:/bin", "RAY_ADDRESS": ""},
    )
    assert bad.returncode == 2 and "needs rollout.backend: vllm" in bad.stderr, bad.stderr[-2000:]
    assert "Traceback" not in bad.stderr and not (tmp_path / "config.yaml").exists()  # nothing started or written


def test_offload_reaches_deepspeed_and_the_plan() -> None:
    cfg = load_config(ROOT / "cluster_configs" / "local-cpu" / "grpo.yaml", ["trainer.offload=all", "trainer.zero_stage=3"])
    zero = deepspeed_config(trainer_settings(cfg, "policy", total_steps=1), 1, bf16=False)["zero_optimization"]
    assert zero == {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
    assert "offload all to host memory" in check_plan(cfg).of("policy")[0].path
    plain = load_config(ROOT / "cluster_configs" / "local-cpu" / "grpo.yaml")
    assert deepspeed_config(trainer_settings(plain, "policy", total_steps=1), 1, bf16=False)["zero_optimization"] == {"stage": 0}


@pytest.mark.parametrize("name", ["grpo.yaml", "dapo.yaml", "agent_grpo.yaml"])
def test_gpu_1x8_config_is_accepted_by_validate_and_plan(name: str) -> None:
    config = str(ROOT / "cluster_configs" / "gpu-1x8" / name)
    for args in (["validate", config], ["plan", config, "--cluster", "nodes=1,gpus_per_node=8,gpu_mem_gib=80"]):
        done = subprocess.run([sys.executable, "-m", "rayrlhf.launch.cli", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=300)
        assert done.returncode == 0, done.stderr


def test_the_dapo_recipe_is_dapo() -> None:
    """clip-higher, token-level loss, dynamic sampling, overlong filter and soft penalty, no KL (so no reference
    actor), accuracy plus a format term, and pass@k evaluation."""
    cfg = load_config(ROOT / "cluster_configs" / "gpu-1x8" / "dapo.yaml")
    a = cfg.algorithm
    assert (a.name, a.clip_eps, a.clip_eps_high, a.loss_agg, a.kl_coef) == ("grpo", 0.2, 0.28, "token-mean", 0.0)
    assert a.dynamic_sampling and a.max_gen_batches > 1 and a.group_size >= 8
    assert a.overlong_filter and 0 < a.overlong_buffer < cfg.rollout.max_new_tokens and a.overlong_penalty_factor > 0
    assert [f.function for f in cfg.reward.functions] == ["rayrlhf.rewards.math:accuracy", "rayrlhf.rewards.math:format"]
    assert cfg.schedule.eval_samples > 1 and max(cfg.schedule.eval_pass_k) == cfg.schedule.eval_samples
    plan = check_plan(cfg)
    assert not plan.of("reference") and plan.total_gpus == 8

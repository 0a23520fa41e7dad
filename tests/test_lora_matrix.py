"""GRPO with a LoRA policy on every row of the architecture matrix, PPO on a dense and a MoE row, the sync verified
at every step.

Each case is a real 2-step job (Ray, vLLM on CPU, DeepSpeed) on the row's tiny model. Dense rows sync the
adapter into vLLM's LoRA slots, checked each step by reading it back from vLLM's LoRA layers and by the
engine/trainer log-prob probe; mixture-of-experts rows sync the merged weights (vLLM's CPU build has no
LoRA kernels for MoE layers), checked by the usual per-tensor checksums. Both sample with the trainer's
distribution: the engine/trainer log-prob gap on the sampled tokens stays at float32 round-off.
The jobs share the rows' model files (built once) and the session's Ray instance. PPO (whose critic trains whole) adds
the critic's path to the same sync, so it runs on one dense and one mixture-of-experts row (`bench/architecture_jobs.py` runs the rest).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from jobs import ROOT

from rayrlhf.config import load_config
from rayrlhf.launch.run import run_job
from rayrlhf.models.architectures import MATRIX
from rayrlhf.orchestrator.metrics import read_metrics
from rayrlhf.orchestrator.plan import _is_moe, resolve_lora_sync

pytestmark = pytest.mark.slow
CONFIGS = ROOT / "cluster_configs" / "local-cpu"
COMMON = ("schedule.steps=2", "checkpoint.every=0", "data.eval=null", "schedule.verify_sync_every=1", "rollout.backend=vllm",
          "rollout.dtype=float32", "model.lora.rank=8", "schedule.prompts_per_step=4", "trainer.mini_batch_size=null")
ALGOS = {"grpo": ("algorithm.group_size=4",), "ppo": ("trainer.mini_batch_size=2",)}
PPO_ROWS = ("qwen2", "mixtral")
CASES = [(name, "grpo") for name in MATRIX] + [(name, "ppo") for name in PPO_ROWS]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lora-matrix-models")


@pytest.mark.parametrize(("name", "algo"), CASES, ids=[f"{n}-{a}" for n, a in CASES])
def test_lora_job_on_the_row(ray_local: None, models: Path, tmp_path: Path, name: str, algo: str) -> None:
    model = f"tiny:{name}"
    overrides = [f"output_dir={tmp_path / 'run'}", f"model.policy={model}", *COMMON, *ALGOS[algo]]
    if algo == "ppo":
        overrides.append(f"model.critic={model}")
    cfg = load_config(CONFIGS / f"{algo}.yaml", overrides)
    cfg.output_dir = str(tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".models").symlink_to(models, target_is_directory=True)  # the row's model, built once
    sync, _ = resolve_lora_sync(cfg, "vllm")
    assert sync == ("merged" if _is_moe(model) else "adapter")
    run_job(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["weight_version"] == 2
    assert max(r["rollout/logprob_mismatch"] for r in rows) < 1e-4, rows
    assert rows[0]["kl/mean"] < 1e-6  # a fresh adapter is the base model, which is the reference
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()

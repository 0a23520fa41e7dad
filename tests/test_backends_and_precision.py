"""Decisions made before anything starts, without Ray: the training precision (`trainer.bf16` with `model.dtype`),
which rollout engine `rollout.backend: auto` picks for an architecture and what no engine can take, and the
transformers engine taking weight updates for a model whose checkpoint names differ from its memory (GPT-NeoX)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rayrlhf.config import ConfigError, load_config
from rayrlhf.models.architectures import build_model_type
from rayrlhf.models.loading import training_precision

ROOT = Path(__file__).resolve().parents[1]
GRPO = ROOT / "cluster_configs" / "local-cpu" / "grpo.yaml"
NEOX = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
        "max_position_embeddings": 512}


# ---------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_bf16_off_with_half_precision_weights_is_refused_naming_both_keys(dtype: str) -> None:
    with pytest.raises(ConfigError, match=rf"trainer\.bf16: false with model\.dtype: {dtype} .*no float32 master"):
        load_config(GRPO, ["trainer.bf16=false", f"model.dtype={dtype}"])
    with pytest.raises(ValueError, match=r"trainer\.bf16: false with model\.dtype"):
        training_precision(dtype, False)  # the trainer refuses it too, whoever built its settings


@pytest.mark.skipif(torch.cuda.is_available(), reason="the defaults below are those of a machine without a GPU")
@pytest.mark.parametrize("dtype, bf16, expected", [
    ("auto", None, (False, "float32")),       # CPU: float32 throughout, as before
    ("bfloat16", None, (True, "bfloat16")),   # bf16 weights: mixed precision keeps float32 masters
    ("float16", None, (False, "float32")),    # no fp16 mixed precision here: the trainer holds float32
    ("float32", True, (True, "float32")),     # DeepSpeed casts to bf16 and keeps the float32 masters
    ("auto", False, (False, "float32")),
])
def test_training_precision_always_steps_float32(dtype: str, bf16: bool | None, expected: tuple[bool, str]) -> None:
    assert training_precision(dtype, bf16) == expected


@pytest.mark.slow
def test_bf16_weights_on_cpu_train_through_float32_masters(tmp_path: Path) -> None:
    """lr 1e-5 on weights of 0.01 and more: each AdamW update is below half a bfloat16 spacing there (3e-5), so plain
    bf16 AdamW (what `model.dtype: bfloat16` ran on CPU before) leaves every such weight as it was; float32 masters
    accumulate the updates until the bf16 weights move."""
    import socket

    import deepspeed.comm.torch as ds_comm_torch

    from rayrlhf.actors.trainer import TrainerRank, TrainerSettings
    from rayrlhf.models.forward import pack_batch
    from rayrlhf.models.tiny import build_tiny_model

    ds_comm_torch.build_shm_op = lambda: None
    path = build_tiny_model(tmp_path / "tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = TrainerSettings(zero_stage=0, micro_batch_size=4, lr=1e-5, dtype="bfloat16", num_threads=1)
    rank = TrainerRank.__ray_metadata__.modified_class("policy", str(path), 0, 1, "127.0.0.1", port, settings)
    rank.setup()
    try:
        weight = rank.engine.module.hf.model.layers[0].mlp.down_proj.weight
        assert weight.dtype == torch.bfloat16
        before = weight.detach().clone()
        batch = pack_batch([[5, 6, 7]] * 4, [[8, 9, 10, 11]] * 4, 0)
        for _ in range(30):
            rank.train_step(batch, "sft", {})
        coarse = before.abs() >= 0.01  # bf16 spacing >= 6e-5 there: 30 updates of ~1e-5 cross it only in float32
        assert coarse.float().mean() > 0.5
        changed = (weight.detach() != before)[coarse].float().mean().item()
        assert changed > 0.9, changed  # measured: 0.98 with float32 masters, 0.0 with plain bf16 AdamW
    finally:
        rank.shutdown()


# ---------------------------------------------------------------- backends


@pytest.fixture(scope="module")
def neox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_type("gpt_neox", tmp_path_factory.mktemp("neox") / "model", **NEOX)


def test_the_hf_engine_takes_gpt_neox_whose_checkpoint_renames_lm_head(neox: Path, tmp_path: Path) -> None:
    """GPT-NeoX's checkpoint holds `embed_out.weight`, transformers' memory `lm_head.weight`: weights arrive under the
    checkpoint's names, and after loading another model's the engine reports exactly that model's checksums."""
    from rayrlhf.actors.engines import HFEngine
    from rayrlhf.actors.weights import bucketize, full_region, tensor_checksum
    from rayrlhf.models.hf_layout import checkpoint_state
    from rayrlhf.models.loading import load_policy

    other = build_model_type("gpt_neox", tmp_path / "other", seed=1, **NEOX)
    sent = dict(checkpoint_state(load_policy(other, "float32")))
    assert "embed_out.weight" in sent and "lm_head.weight" not in sent
    engine = HFEngine(neox, dtype="float32")
    names = list(sent)
    assert engine.checksums(names) != {(n, full_region(t.shape)): tensor_checksum(t) for n, t in sent.items()}
    engine.begin_weight_update({})
    for bucket in bucketize(sent.items(), 4096):
        engine.load_weights(bucket)
    engine.finish_weight_update()
    assert engine.checksums(names) == {(n, full_region(t.shape)): tensor_checksum(t) for n, t in sent.items()}


def test_auto_picks_an_engine_that_can_take_the_model(neox: Path) -> None:
    from rayrlhf.orchestrator.plan import plan_actors, resolve_backend

    cfg = load_config(GRPO, [f"model.policy={neox}"])
    assert resolve_backend(cfg) == "hf"  # small, on CPU, updatable in place up to names
    assert not plan_actors(cfg).problems
    moe = load_config(GRPO, ["model.policy=tiny:qwen3-moe"])  # fused experts in memory, per expert in the checkpoint
    assert resolve_backend(moe) == "vllm"
    assert not plan_actors(moe).problems
    hf = load_config(GRPO, ["model.policy=tiny:qwen3-moe", "rollout.backend=hf"])
    assert any("rollout.backend: hf cannot take weight updates for model.policy tiny:qwen3-moe" in p
               for p in plan_actors(hf).problems)


def test_what_no_engine_can_take_is_refused_before_ray_naming_the_key(tmp_path: Path) -> None:
    """Without vLLM (hidden from the import system in a child process), `auto` has no engine for a model with fused
    experts: `rayrlhf train` exits 2 naming rollout.backend before Ray starts or anything is written."""
    script = (
        "import sys, importlib.util\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'vllm' else real(name, *a)\n"
        "from rayrlhf.launch.cli import main\n"
        f"code = main(['train', {str(GRPO)!r}, '--set', 'model.policy=tiny:qwen3-moe', '--set', 'output_dir={tmp_path}'])\n"
        "import ray\n"
        "print('ray started' if ray.is_initialized() else 'ray not started')\n"
        "sys.exit(code)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "rollout.backend: auto finds no engine for model.policy" in out.stderr
    assert "vLLM is not installed" in out.stderr and "Traceback" not in out.stderr
    assert "ray not started" in out.stdout and not (tmp_path / "config.yaml").exists()

"""ZeRO-3 ranks build their model partitioned (`models.partitioned`): the same weights and the same training step as
loading the whole model on every rank (tied embeddings, fused experts, a renamed checkpoint, a new critic head), and
a rank's peak host memory falls with the number of ranks (the ~75M model, 2 and 4 ranks, against whole loading in
the same run; method in tests/capacity_measure.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from rayrlhf.actors.trainer import TrainerSettings
from rayrlhf.actors.trainer_group import TrainerGroup
from rayrlhf.models.architectures import build_architecture, build_model_type
from rayrlhf.models.forward import pack_batch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from capacity_measure import measure_setup  # noqa: E402

pytestmark = pytest.mark.slow

QWEN2_75M = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 2,
             "intermediate_size": 2048}  # the 75M model of bench/peer_trl_grpo.py
MiB = 2**20


def _model(kind: str, where: Path) -> Path:
    if kind == "gpt_neox":
        return build_model_type("gpt_neox", where, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=2, max_position_embeddings=512)
    return build_architecture(kind, where)


def _group(role: str, path: Path, partitioned: bool, name: str) -> TrainerGroup:
    settings = TrainerSettings(zero_stage=3, micro_batch_size=2, lr=1e-3, weight_decay=0.1, dtype="float32",
                               partitioned_init=partitioned)
    return TrainerGroup(role, str(path), settings, num_ranks=2, num_cpus=0.25, name_prefix=name)


@pytest.fixture(params=[("policy", "llama-tied"), ("policy", "qwen3-moe"), ("policy", "gpt_neox"), ("critic", "llama")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def groups(request: pytest.FixtureRequest, ray_local: None, tmp_path: Path) -> Iterator[tuple[str, TrainerGroup, TrainerGroup]]:
    role, kind = request.param
    path = _model(kind, tmp_path / kind)
    whole = _group(role, path, False, f"whole-{role}-{kind}")
    try:
        parted = _group(role, path, True, f"parted-{role}-{kind}")
    except BaseException:
        whole.shutdown()
        raise
    yield role, whole, parted
    whole.shutdown()
    parted.shutdown()


def test_partitioned_ranks_hold_and_train_what_whole_loading_gives(groups: tuple[str, TrainerGroup, TrainerGroup]) -> None:
    """Tied embeddings travel once, Qwen3-MoE's per-expert checkpoint fills its fused in-memory experts, GPT-NeoX's
    `embed_out` lands in `lm_head`, and a critic's new `score` head is initialised as whole loading initialises it
    (same seed): every full tensor is equal, and so are a training step's figures and the weights after it."""
    role, whole, parted = groups
    built = [ray.get(a.__ray_call__.remote(lambda rank: rank.built_partitioned)) for a in parted.actors + whole.actors]
    assert built == [True, True, False, False]  # no silent fallback to whole loading
    assert parted.checksums() == whole.checksums()
    batch = pack_batch([[5, 6, 7], [9, 8]], [[8, 9, 10], [11, 12, 13]], 0)
    if role == "policy":
        loss, args = "sft", {}
    else:
        batch.update(returns=torch.ones(2, 3), old_values=torch.zeros(2, 3))
        loss, args = "value", {"value_clip_eps": 0.2}
    assert parted.train_step(batch, loss, args) == whole.train_step(batch, loss, args)
    assert parted.checksums() == whole.checksums()


def test_a_rank_needs_less_host_memory_the_more_ranks_share_the_model(tmp_path: Path) -> None:
    """Peaks of each rank (ZeRO-3, float32, one process per rank): over building the model, and over the whole
    setup with DeepSpeed's engine (its own ZeRO-3 state is 3 float32 partitions: weights, master copy, gradients).
    Whole loading holds the full model on every rank until DeepSpeed partitions it (file pages on rank 0, a private
    copy on the ranks that receive rank 0's broadcast); partitioned, a rank holds its partition and one module."""
    model = build_architecture("qwen2", tmp_path / "qwen2-75m", **QWEN2_75M)
    size = (model / "model.safetensors").stat().st_size
    peaks = {(n, part): measure_setup(model, n, part) for n in (2, 4) for part in (False, True)}

    def top(n: int, part: bool, key: str) -> float:
        return max(p[key] for p in peaks[(n, part)]) / MiB

    lines = [f"model {size / MiB:.0f} MiB (float32)"]
    for n in (2, 4):
        lines.append(f"{n} ranks: construction {top(n, True, 'construction'):.0f} MiB partitioned; setup "
                     f"{top(n, False, 'setup'):.0f} MiB whole, {top(n, True, 'setup'):.0f} partitioned; private setup "
                     f"{top(n, False, 'setup_anonymous'):.0f} whole, {top(n, True, 'setup_anonymous'):.0f} partitioned")
    report = "\n".join(lines)
    print("\n" + report)
    size /= MiB  # the peaks are in MiB too
    module = size / QWEN2_75M["num_hidden_layers"]  # one decoder layer, about
    for n in (2, 4):  # building holds this rank's partition and a module or two, never the model
        assert top(n, True, "construction") < size / n + 3 * module, report
    assert top(2, True, "construction") - top(4, True, "construction") > 0.8 * size / 4, report  # falls as 1/ranks
    for key in ("setup", "setup_anonymous"):
        assert top(2, True, key) <= top(2, False, key) + 16, report  # 2 ranks: DeepSpeed's own state dominates
        assert top(4, True, key) < top(4, False, key) - 0.3 * size, report  # 4 ranks: the full model is gone

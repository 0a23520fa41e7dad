"""The capacity planner: model shapes from config.json, the memory formulas against hand-computed values and
against measured peaks of real DeepSpeed steps on CPU, placement on a cluster, `rayrlhf plan`'s exit codes and
the smallest change it proposes, and the warnings for CPU-valued keys on a GPU cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rayrlhf.config import load_config
from rayrlhf.errors import InvalidInput
from rayrlhf.orchestrator.capacity import (
    REDUCE_BUCKET,
    GiB,
    ModelShape,
    TrainerSetup,
    host_trainer_bytes,
    layer_activation_bytes,
    logits_bytes,
    model_config,
    model_shape,
    pass_rows,
    trainer_estimate,
    zero_state,
)
from rayrlhf.orchestrator.capacity_plan import (
    Cluster,
    check_capacity,
    cluster_from_nodes,
    cpu_valued_warnings,
    smallest_fix,
)
from rayrlhf.orchestrator.known_models import KNOWN_CONFIGS

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
GPU_1X8 = ROOT / "cluster_configs" / "gpu-1x8" / "grpo.yaml"
LOCAL_GRPO = ROOT / "cluster_configs" / "local-cpu" / "grpo.yaml"
ONE_BY_EIGHT = Cluster.parse("nodes=1,gpus_per_node=8,gpu_mem_gib=80")
QWEN = {size: DATA / f"qwen2.5-{size}" for size in ("7b", "32b", "72b")}


def torch_param_count(config: dict) -> int:
    """Parameters of the transformers model built from `config` on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


# ---------------------------------------------------------------- shapes

@pytest.mark.parametrize("row", ["llama", "llama-tied", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3",
                                 "qwen3-moe", "mixtral"])
def test_parameter_count_equals_transformers_for_every_architecture_row(row: str) -> None:
    config = model_config(f"tiny:{row}")
    assert model_shape(f"tiny:{row}").num_params == torch_param_count(config)


@pytest.mark.parametrize("row", ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "qwen3-moe", "mixtral"])
def test_lora_adapter_size_equals_peft_on_every_row(row: str) -> None:
    """The planner's adapter size against the parameters peft really adds (all-linear, rank 8, on the meta model).
    Phi-3 fuses q/k/v and gate/up in one layer each: the planner, counting them apart, may only overestimate."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rayrlhf.models.lora import LoraSpec, apply_lora

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**model_config(f"tiny:{row}")))
    peft = apply_lora(model, LoraSpec(rank=8))
    added = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    planned = model_shape(f"tiny:{row}").lora_params(8)
    assert planned == added if row != "phi3" else added <= planned <= 2 * added, (planned, added)
    attention_only = model_shape(f"tiny:{row}").lora_params(8, ("q_proj", "k_proj", "v_proj", "o_proj"))
    if row != "phi3":
        peft = apply_lora(AutoModelForCausalLM.from_config(AutoConfig.for_model(**model_config(f"tiny:{row}"))),
                          LoraSpec(rank=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
        assert attention_only == sum(p.numel() for p in peft.parameters() if p.requires_grad)


def test_lora_plan_keeps_the_weights_and_shrinks_the_optimizer_side() -> None:
    """A LoRA policy holds the whole model's weights but gradients, masters and Adam states of the adapter only."""
    full = check_capacity(load_config(GPU_1X8), ONE_BY_EIGHT)
    lora = check_capacity(load_config(GPU_1X8, ["model.lora.rank=16"]), ONE_BY_EIGHT)
    policy = {r: next(a.estimate for a in rep.actors if a.spec.name == "policy-0") for r, rep in (("full", full), ("lora", lora))}
    shape = full.models["model.policy"]
    adapter = shape.lora_params(16)
    ranks = load_config(GPU_1X8).trainer.policy.num_ranks
    assert policy["lora"].terms["adam m+v"] == pytest.approx(8 * adapter / ranks)
    assert policy["lora"].terms["weights"] >= policy["full"].terms["weights"]  # base + adapter
    assert policy["lora"].peak < policy["full"].peak - policy["full"].terms["adam m+v"] / 2
    critic_free = [a.spec.name for a in lora.actors if a.spec.role == "critic"]
    assert not critic_free  # grpo: no critic; the reference is the policy with its adapter off
    assert "reference" not in {a.spec.role for a in lora.actors}


@pytest.mark.parametrize("size, params, kv_per_token", [
    ("7b", 7_615_616_512, 28 * 2 * 4 * 128 * 2),  # layers x (k, v) x kv heads x head_dim x bf16
    ("32b", 32_763_876_352, 64 * 2 * 8 * 128 * 2),
    ("72b", 72_706_203_648, 80 * 2 * 8 * 128 * 2),
])
def test_qwen25_shapes_from_their_config_json(size: str, params: int, kv_per_token: int) -> None:
    config = json.loads((QWEN[size] / "config.json").read_text())
    shape = model_shape(str(QWEN[size]))
    assert shape.num_params == params == torch_param_count(config)
    assert shape.kv_bytes_per_token(2) == kv_per_token
    # kv heads split over the tensor-parallel ranks; past their count (7B has 4) each rank keeps one
    assert shape.kv_bytes_per_token(2, tp=8) == kv_per_token // min(8, shape.kv_heads)
    known = KNOWN_CONFIGS[f"Qwen/Qwen2.5-{size.upper()}"]  # the shapes the planner ships agree with the files
    assert {k: config[k] for k in known} == known
    assert model_shape(f"Qwen/Qwen2.5-{size.upper()}-Instruct").num_params == params


def test_unknown_models_and_bad_configs_are_refused_naming_them(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="nobody/unknown-model: no config.json found"):
        model_config("nobody/unknown-model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(InvalidInput, match="lacks"):
        model_shape(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InvalidInput, match="not JSON"):
        model_config(str(tmp_path))


# ---------------------------------------------------------------- formulas, hand-computed

SMALL = ModelShape("llama", hidden=64, layers=2, heads=2, kv_heads=2, head_dim=32, intermediate=128, vocab=100, tied=False)


def test_layer_activations_hand_computed() -> None:
    # fp32: 2 norms x (4 + 8) x 64 + 5 x 64 x 4 (q, k, v, SDPA out, o_proj in) + 4 x 2 (lse) + 4 x 128 x 4 (MLP)
    assert layer_activation_bytes(SMALL, 4) == 2 * 12 * 64 + 5 * 64 * 4 + 8 + 4 * 128 * 4 == 4872
    # bf16: the norms' fp32 copies stay 4 bytes
    assert layer_activation_bytes(SMALL, 2) == 2 * 8 * 64 + 5 * 64 * 2 + 8 + 4 * 128 * 2


def test_logits_stay_in_the_model_dtype_and_float32_work_is_one_block() -> None:
    # 4 rows x 17 positions x 100 vocab in bf16, kept for backward, plus their bf16 gradient, plus three float32
    # [64, 100] blocks (no float32 copy of the logits is kept: blocks are recomputed in backward)
    assert logits_bytes(SMALL, 4, 16, 2, training=True) == 2 * 2 * 4 * 17 * 100 + 3 * 64 * 100 * 4
    # forward only: the bf16 logits and the block temporaries
    assert logits_bytes(SMALL, 4, 16, 2, training=False) == 2 * 4 * 17 * 100 + 3 * 64 * 100 * 4


@pytest.mark.parametrize("stage, weights, master, adam, grads", [
    (0, 2e9, 4e9, 8e9, 2e9),        # everything whole on every rank
    (1, 2e9, 0.5e9, 1e9, 2e9),      # optimizer state partitioned over 8 ranks
    (2, 2e9, 0.5e9, 1e9, 0.25e9),   # + gradients
    (3, 0.25e9, 0.5e9, 1e9, 0.25e9),  # + parameters
])
def test_zero_stages_partition_what_the_paper_says(stage: int, weights: float, master: float, adam: float,
                                                   grads: float) -> None:
    setup = TrainerSetup(ranks=8, stage=stage, d=2, rows=1, width=8, response=4, passes=1, checkpointing=False,
                         logits=True, cuda=True)
    state = zero_state(1_000_000_000, None, setup)
    assert (state["weights"], state["master fp32"], state["adam m+v"], state["grads"]) == (weights, master, adam, grads)
    assert state["reduce bucket"] == (0 if stage == 0 else REDUCE_BUCKET * 2)  # reserved whole on a GPU


def test_gradient_checkpointing_keeps_one_input_per_layer() -> None:
    shape = model_shape(str(QWEN["7b"]))
    base = dict(ranks=8, stage=3, d=2, rows=4, width=3072, response=2048, passes=4, logits=True, cuda=True)
    full = trainer_estimate(shape, TrainerSetup(checkpointing=False, **base))
    ckpt = trainer_estimate(shape, TrainerSetup(checkpointing=True, **base))
    assert ckpt.terms["activations"] == 28 * 3584 * 2 * 4 * 3072 + (4 + 4) * 3584 * 4 * 3072
    assert full.terms["activations"] > 20 * ckpt.terms["activations"]
    assert ckpt.peak < full.peak


@pytest.mark.parametrize("per_rank, width, mbs, tokens", [(32, 3072, 4, 8192), (32, 3072, None, 8192),
                                                         (7, 100, None, 256), (5, 40, 2, 8192), (1, 500, None, 64)])
def test_pass_rows_cut_a_shard_as_the_trainer_does(per_rank: int, width: int, mbs: int | None, tokens: int) -> None:
    import torch

    from rayrlhf.actors.losses_step import is_main_key, num_micro_batches, split_rows

    batch = {"input_ids": torch.zeros(per_rank, width, dtype=torch.long), "mask": torch.ones(per_rank, 4)}
    n = num_micro_batches(batch, mbs, tokens)
    rows = max(c["input_ids"].shape[0] for c in split_rows(batch, n, is_main_key))
    assert pass_rows(per_rank, width, mbs, tokens) == (rows, n)


# ---------------------------------------------------------------- estimates against measured peaks

MEASURED = [  # (architecture row, its shape overrides, ZeRO stage, ranks, rows, prompt, response, checkpointing, offload)
    ("qwen2", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 2,
               "intermediate_size": 2048}, 0, 1, 4, 64, 128, False, "none"),  # the 75M model of bench/peer_trl_grpo.py
    ("qwen2", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 2,
               "intermediate_size": 2048}, 0, 1, 4, 64, 128, True, "none"),
    ("llama", {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
               "intermediate_size": 512, "vocab_size": 32000}, 0, 1, 8, 64, 128, False, "none"),  # logits dominate
    ("llama", {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
               "intermediate_size": 512, "vocab_size": 32000}, 1, 1, 8, 64, 128, False, "optimizer"),  # ZeRO-Offload
    ("qwen3-moe", {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "head_dim": 64, "moe_intermediate_size": 256, "num_experts": 8, "num_experts_per_tok": 2,
                   "vocab_size": 8000}, 0, 1, 8, 64, 128, False, "none"),
    ("gemma2", {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 64, "query_pre_attn_scalar": 64, "intermediate_size": 768, "vocab_size": 16000},
     0, 1, 8, 64, 128, False, "none"),
    ("qwen2", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 2,
               "intermediate_size": 2048}, 2, 2, 2, 64, 128, False, "none"),
    ("qwen2", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 2,
               "intermediate_size": 2048}, 3, 2, 2, 64, 128, False, "none"),
]


@pytest.mark.slow
def test_trainer_estimates_are_within_25_percent_of_measured_peaks(tmp_path: Path) -> None:
    """Each case runs the real TrainerRank (DeepSpeed on CPU, float32, one process per rank) for a step and reads
    its peak resident memory (tests/capacity_measure.py explains the method); the estimate must be within ±25%."""
    sys.path.insert(0, str(ROOT / "tests"))
    from capacity_measure import measure

    from rayrlhf.models.architectures import build_architecture

    rows_out = []
    for i, (arch, shape, stage, ranks, rows, prompt, response, ckpt, offload) in enumerate(MEASURED):
        model = build_architecture(arch, tmp_path / f"{arch}-{i}", **shape)
        setup = TrainerSetup(ranks=ranks, stage=stage, d=4, rows=rows, width=prompt + response, response=response,
                             passes=1, checkpointing=ckpt, logits=True, cuda=False, offload=offload)
        shape_ = model_shape(str(model))  # on CPU the offloaded state is in the same process: add the host part
        estimate = trainer_estimate(shape_, setup).peak + host_trainer_bytes(shape_.num_params, setup)
        measured = max(measure(model, stage, ranks, rows, prompt, response, ckpt, offload))
        rows_out.append((arch, stage, ranks, ckpt, offload, measured / GiB, estimate / GiB, estimate / measured))
    report = "\n".join(f"{a:<10} ZeRO-{s} x{r} ckpt={c!s:<5} offload={o:<9} measured {m:.3f} GiB, estimate {e:.3f} GiB "
                       f"({q:.2f})" for a, s, r, c, o, m, e, q in rows_out)
    print(report)
    assert all(0.75 <= q <= 1.25 for *_, q in rows_out), report


# ---------------------------------------------------------------- placement and the plan

def test_shipped_gpu_1x8_config_fits_one_node_of_eight_80gb_gpus() -> None:
    report = check_capacity(load_config(GPU_1X8), ONE_BY_EIGHT)
    assert report.fits, report.table()
    placed = {a.spec.name: a.gpus for a in report.actors if a.spec.num_gpus}
    assert sorted(g for gpus in placed.values() for g in gpus) == [(0, i) for i in range(8)]  # every GPU, once


@pytest.mark.parametrize("name", ["grpo.yaml", "ppo.yaml"])
def test_shipped_2x8_configs_fit_the_a100_40gb_nodes_they_name(name: str) -> None:
    overrides = [f"model.{k}={QWEN['7b']}" for k in ("policy", "critic", "reward")] if name == "ppo.yaml" else []
    cfg = load_config(ROOT / "cluster_configs" / "gpu-2x8" / name, overrides)  # ppo's models live on shared storage
    report = check_capacity(cfg, Cluster.parse("nodes=2,gpus_per_node=8,gpu_mem_gib=40"))
    assert report.fits, report.table()


def test_a_gpu_too_small_names_the_actor_and_by_how_much() -> None:
    report = check_capacity(load_config(GPU_1X8), Cluster.parse("nodes=1,gpus_per_node=8,gpu_mem_gib=40"))
    assert not report.fits
    [problem] = [p for p in report.problems if p.startswith("policy-0")]
    assert "GiB short" in problem and "policy-3 (4 actors)" in problem


def test_too_few_gpus_is_a_placement_problem() -> None:
    report = check_capacity(load_config(GPU_1X8), Cluster.parse("nodes=1,gpus_per_node=4,gpu_mem_gib=80"))
    assert any("no GPU left for" in p and "the cluster has 4" in p for p in report.problems)


def test_fractional_servers_share_one_gpu_and_their_memory_adds_up() -> None:
    cfg = load_config(GPU_1X8, [f"model.reward={QWEN['7b']}", "reward.function=null", "reward.num_workers=1",
                                "servers.reference_num_gpus=0.5", "servers.reward_num_gpus=0.5"])
    report = check_capacity(cfg, ONE_BY_EIGHT)
    ref, reward = (next(a for a in report.actors if a.spec.role == role) for role in ("reference", "reward"))
    assert ref.gpus == reward.gpus  # one GPU for the two frozen servers
    assert reward.budget == pytest.approx(80 * GiB * 0.95 - ref.estimate.peak)


def test_a_colocated_reference_shares_policy_0s_gpu_and_both_budgets_leave_room_for_the_other() -> None:
    from rayrlhf.orchestrator.plan import check_plan, colocated_rank_gpus

    apart = check_capacity(load_config(GPU_1X8, ["rollout.num_workers=4"]), ONE_BY_EIGHT)
    assert any("no GPU left for policy-3" in p and "asks for 9 GPUs" in p for p in apart.problems)
    cfg = load_config(GPU_1X8, ["rollout.num_workers=4", "servers.colocate=true", "servers.reference_num_gpus=0.25"])
    report = check_capacity(cfg, ONE_BY_EIGHT)
    assert report.fits, report.table()
    by_name = {a.spec.name: a for a in report.actors}
    ref, rank0, rank1 = by_name["reference"], by_name["policy-0"], by_name["policy-1"]
    assert ref.spec.beside == "policy-0" and ref.gpus == rank0.gpus and ref.gpus != rank1.gpus
    assert sorted(g for a in report.actors if not a.spec.beside for g in a.gpus) == [(0, i) for i in range(8)]
    total = 80 * GiB * 0.95  # one GPU: each budget is what the other leaves
    assert rank0.budget == pytest.approx(total - ref.estimate.peak)
    assert ref.budget == pytest.approx(total - rank0.estimate.peak)
    assert rank1.budget == pytest.approx(total)
    plan = check_plan(cfg)
    assert plan.total_gpus == 8 and colocated_rank_gpus(plan, 1.0) == 0.75
    # the planner proposes it when the servers' GPUs are what is missing
    fix = smallest_fix(load_config(GPU_1X8, ["rollout.num_workers=4"]), ONE_BY_EIGHT, apart)
    assert fix is not None and fix.overrides == {"servers.colocate": True, "servers.reference_num_gpus": 0.25}


def test_vllm_share_below_its_needs_is_refused_and_the_fix_raises_it() -> None:
    cfg = load_config(GPU_1X8, ["rollout.gpu_memory_utilization=0.2"])
    report = check_capacity(cfg, ONE_BY_EIGHT)
    assert any(p.startswith("rollout-0") and "gpu_memory_utilization share" in p for p in report.problems)
    fix = smallest_fix(cfg, ONE_BY_EIGHT, report)
    assert fix is not None and fix.overrides == {"rollout.gpu_memory_utilization": 0.85}


def test_smallest_fix_is_the_cheapest_single_change_that_fits() -> None:
    # without checkpointing the policy's activations do not fit 80 GB; checkpointing alone is enough
    cfg = load_config(GPU_1X8, ["trainer.gradient_checkpointing=false"])
    report = check_capacity(cfg, ONE_BY_EIGHT)
    assert not report.fits
    fix = smallest_fix(cfg, ONE_BY_EIGHT, report)
    assert fix is not None and fix.overrides == {"trainer.gradient_checkpointing": True} and fix.report.fits


def test_72b_on_eight_gpus_has_no_fix() -> None:
    cfg = load_config(GPU_1X8, [f"model.policy={QWEN['72b']}"])
    report = check_capacity(cfg, ONE_BY_EIGHT)
    assert not report.fits and smallest_fix(cfg, ONE_BY_EIGHT, report) is None


def test_cluster_spec_errors_name_the_part() -> None:
    for spec, message in [("nodes=1,gpus=8", "'gpus=8'"), ("nodes=1,gpus_per_node=x,gpu_mem_gib=80", "not a number"),
                          ("nodes=1,gpus_per_node=8", "gpu_mem_gib")]:
        with pytest.raises(InvalidInput, match=message):
            Cluster.parse(spec)
    assert Cluster.parse("nodes=2,gpus_per_node=8,gpu_mem_gib=80,host_mem_gib=1000").nodes[1].host_mem_gib == 1000


def test_cluster_from_ray_nodes_keeps_alive_gpu_nodes_with_known_memory() -> None:
    nodes = [{"NodeID": "a", "Alive": True, "Resources": {"CPU": 96, "GPU": 8, "memory": 512 * GiB}},
             {"NodeID": "b", "Alive": False, "Resources": {"GPU": 8}},
             {"NodeID": "c", "Alive": True, "Resources": {"CPU": 8}},
             {"NodeID": "d", "Alive": True, "Resources": {"GPU": 4}}]
    cluster = cluster_from_nodes(nodes, {"a": 79.6, "d": 39.4})
    assert [(n.gpus, n.gpu_mem_gib, n.host_mem_gib) for n in cluster.nodes] == [(8, 79.6, 512), (4, 39.4, None)]


# ---------------------------------------------------------------- the command

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rayrlhf.launch.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_plan_command_exit_codes_and_its_fix_fits() -> None:
    ok = run_cli("plan", str(GPU_1X8), "--cluster", "nodes=1,gpus_per_node=8,gpu_mem_gib=80")
    assert ok.returncode == 0, ok.stderr
    assert "policy-0 .. policy-3" in ok.stdout and ok.stdout.rstrip().endswith("fits")
    small = ["plan", str(GPU_1X8), "--cluster", "nodes=1,gpus_per_node=8,gpu_mem_gib=48"]
    bad = run_cli(*small)
    assert bad.returncode == 2
    assert "does not fit the cluster" in bad.stderr and "policy-0" in bad.stderr
    fix = bad.stderr.split("smallest change that fits: ")[1].split("  (")[0].split()
    assert fix[0] == "--set"
    assert run_cli(*small, *fix).returncode == 0  # the proposed change really fits
    assert run_cli("plan", str(GPU_1X8), "--cluster", "nodes=1").returncode == 2


# ---------------------------------------------------------------- CPU-valued keys on a GPU cluster

def test_cpu_valued_keys_are_named_on_a_gpu_cluster() -> None:
    warnings = cpu_valued_warnings(load_config(LOCAL_GRPO), {"CPU": 96.0, "GPU": 8.0})
    text = "\n".join(warnings)
    for key in ("rollout.num_gpus is 0", "trainer.policy.num_gpus is 0", "servers.reference_num_gpus is 0"):
        assert key in text
    on_gpu = load_config(LOCAL_GRPO, ["rollout.num_gpus=1", "trainer.policy.num_gpus=1", "servers.reference_num_gpus=1"])
    text = "\n".join(cpu_valued_warnings(on_gpu, {"GPU": 8.0}))
    assert "rollout.gpu_memory_utilization is 0.2" in text and "rollout.enforce_eager is true" in text
    assert cpu_valued_warnings(load_config(LOCAL_GRPO), {"CPU": 2.0}) == []
    assert cpu_valued_warnings(load_config(GPU_1X8), {"GPU": 8.0}) == []


def test_offload_moves_the_optimizer_state_to_the_host_and_the_host_is_checked() -> None:
    # Qwen2.5-32B on one node of 8, 2 ranks, ZeRO-3, everything offloaded (docs/memory.md's table offloads the optimizer only)
    cfg = load_config(GPU_1X8, [
        f"model.policy={QWEN['32b']}", "trainer.zero_stage=3", "trainer.offload=all", "trainer.policy.num_ranks=2",
        "rollout.tensor_parallel_size=4", "rollout.num_gpus=4", "rollout.num_workers=1", "servers.micro_batch_size=2"])
    roomy = check_capacity(cfg, Cluster.parse("nodes=1,gpus_per_node=8,gpu_mem_gib=80,host_mem_gib=1000"))
    assert roomy.fits, roomy.table()
    policy = next(a for a in roomy.actors if a.spec.role == "policy")
    n = model_shape(str(QWEN["32b"])).num_params
    assert policy.host == pytest.approx((16 * n + 2 * n) / 2)  # master, m, v, fp32 grads and bf16 weights, per rank
    assert policy.estimate.terms["adam m+v"] == 0 and policy.estimate.terms["weights"] == 0
    tight = check_capacity(cfg, Cluster.parse("nodes=1,gpus_per_node=8,gpu_mem_gib=80,host_mem_gib=256"))
    assert any(p.startswith("host memory of node 0: ZeRO-Offload of policy-0 .. policy-1") for p in tight.problems)

"""LoRA without Ray: the config, which layers get an adapter, the adapter's names and the merged weights
against peft's own merge, the actor plan (no reference actor, the sync mode), and the probe's helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rayrlhf.actors.rollout import _engine_kwargs
from rayrlhf.actors.trainer_group import trainer_settings
from rayrlhf.config import ConfigError, load_config
from rayrlhf.models.architectures import build_architecture
from rayrlhf.models.forward import pack_batch, token_logprobs
from rayrlhf.models.hf_layout import checkpoint_format, checkpoint_state
from rayrlhf.models.lora import (
    LoraSpec,
    adapter_units,
    apply_lora,
    merged_units,
    meta_model,
    saved_units,
    strip_adapter_name,
    target_module_names,
    vllm_max_lora_rank,
)
from rayrlhf.orchestrator.lora_sync import probe_atol, probe_ids
from rayrlhf.orchestrator.plan import check_plan, plan_actors, resolve_lora_sync

ROOT = Path(__file__).resolve().parents[1]
GRPO = ROOT / "cluster_configs/local-cpu/grpo.yaml"
PPO = ROOT / "cluster_configs/local-cpu/ppo.yaml"
DENSE = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-models")
    return {name: build_architecture(name, root / name) for name in ("llama-tied", "phi3", "qwen3-moe")}


def _trained(model: torch.nn.Module, spec: LoraSpec, seed: int = 1) -> object:
    """A peft model whose adapter is not the identity (B drawn at random)."""
    peft = apply_lora(model, spec)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return peft


# ------------------------------------------------------------------------------------------- config


def test_lora_section_is_set_from_the_command_line_and_checked() -> None:
    base = ["algorithm.name=sft"]
    assert load_config(None, base).model.lora is None
    lora = load_config(None, [*base, "model.lora.rank=8", "model.lora.target_modules=[q_proj, v_proj]"]).model.lora
    assert (lora.rank, lora.alpha, lora.dropout, lora.target_modules, lora.sync) == (8, 32.0, 0.0, ["q_proj", "v_proj"], "auto")
    assert load_config(None, [*base, "model.lora={}"]).model.lora.target_modules == "all-linear"
    with pytest.raises(ConfigError, match=r"model\.lora\.rnak: unknown key \(did you mean 'rank'\?\)"):
        load_config(None, [*base, "model.lora.rnak=8"])
    with pytest.raises(ConfigError, match=r"model\.lora\.rank"):
        load_config(None, [*base, "model.lora.rank=0"])
    with pytest.raises(ConfigError, match="empty list"):
        load_config(None, [*base, "model.lora.target_modules=[]"])
    with pytest.raises(ConfigError, match=r"model\.lora\.sync"):
        load_config(None, [*base, "model.lora.sync=half"])


def test_trainer_settings_carry_lora_to_the_policy_and_reward_model_not_the_critic() -> None:
    cfg = load_config(PPO, ["model.lora.rank=8", "model.critic=tiny"])
    assert trainer_settings(cfg, "policy", 1).lora == LoraSpec(8, 32.0, 0.0, "all-linear", "auto")
    assert trainer_settings(cfg, "reward", 1).lora is not None
    assert trainer_settings(cfg, "critic", 1).lora is None


# ------------------------------------------------------------------------------------------- targets


def test_all_linear_is_every_linear_layer_but_the_output_head_and_moe_routers(models: dict[str, Path]) -> None:
    assert target_module_names(meta_model(str(models["llama-tied"])), "all-linear") == DENSE
    assert target_module_names(meta_model(str(models["llama-tied"]), role="reward"), "all-linear") == DENSE  # no score
    assert target_module_names(meta_model(str(models["phi3"])), "all-linear") == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    # transformers 5 keeps MoE experts as fused 3-D parameters and routers as their own modules: attention only
    assert target_module_names(meta_model(str(models["qwen3-moe"])), "all-linear") == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_a_target_list_is_checked_against_the_model(models: dict[str, Path]) -> None:
    model = meta_model(str(models["llama-tied"]))
    assert target_module_names(model, ["v_proj", "q_proj", "v_proj"]) == ["v_proj", "q_proj"]
    with pytest.raises(ValueError, match="'qkv_proj' names no linear layer of this model; its linear layers are"):
        target_module_names(model, ["q_proj", "qkv_proj"])
    with pytest.raises(ValueError, match="'lm_head' names no linear layer"):  # the output layer never gets an adapter
        target_module_names(model, ["lm_head"])


def test_vllm_ranks() -> None:
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 16, 64, 300, 512)] == [1, 8, 8, 16, 16, 64, 320, 512]
    with pytest.raises(ValueError, match="more than vLLM serves"):
        vllm_max_lora_rank(513)


# ------------------------------------------------------------------------------------------- weights


def test_a_fresh_adapter_computes_exactly_what_the_base_does(models: dict[str, Path]) -> None:
    path = models["llama-tied"]
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    peft = apply_lora(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), LoraSpec(rank=8)).eval()
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    batch = pack_batch([[5, 6, 7]], [[8, 9, 10, 11]], 0)
    with torch.no_grad():
        assert torch.equal(token_logprobs(base, batch)[0], token_logprobs(peft.get_base_model(), batch)[0])


@pytest.mark.parametrize("arch", ["llama-tied", "phi3", "qwen3-moe"])
def test_merged_weights_are_peft_merge_in_checkpoint_names(models: dict[str, Path], arch: str) -> None:
    """The merged view (merged sync, export --merge) equals peft's merge_and_unload, tensor for tensor, in the
    checkpoint format (MoE experts per expert, tied weights once), and only adapted layers change."""
    path = models[arch]
    untouched = dict(checkpoint_state(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)))
    peft = _trained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), LoraSpec(rank=8))
    hf = peft.get_base_model()
    ours = {}
    for _, unit in merged_units(hf):
        ours.update(checkpoint_format(hf, unit.produce()))
    reference = dict(checkpoint_state(peft.merge_and_unload()))
    assert sorted(ours) == sorted(reference) == sorted(untouched)
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=1e-6)
    changed = sorted(n for n in untouched if not torch.equal(ours[n], untouched[n]))
    targets = target_module_names(hf, "all-linear")
    assert changed and all(n.rsplit(".", 2)[-2] in targets for n in changed)


def test_adapter_names_are_peft_file_names_and_engine_form_folds_the_scaling(models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    spec = LoraSpec(rank=8, alpha=4.0)
    peft = _trained(AutoModelForCausalLM.from_pretrained(models["llama-tied"], dtype=torch.float32), spec)
    peft.save_pretrained(tmp_path)
    files = load_file(tmp_path / "adapter_model.safetensors")
    saved = {n: t for unit in saved_units(peft.get_base_model()) for n, t in unit.produce().items()}
    assert sorted(saved) == sorted(files)
    assert all(torch.equal(saved[n], files[n]) for n in files)
    engine = {n: t for unit in adapter_units(peft.get_base_model(), engine_form=True) for n, t in unit.produce().items()}
    assert sorted(engine) == sorted(files)
    for name, tensor in files.items():
        assert torch.equal(engine[name], tensor * 0.5 if ".lora_B." in name else tensor)  # alpha / rank = 0.5
    shapes = {n: s for unit in adapter_units(peft.get_base_model(), engine_form=True) for n, (s, _) in unit.shapes().items()}
    assert shapes == {n: tuple(t.shape) for n, t in files.items()}


def test_in_memory_names_become_file_names() -> None:
    assert strip_adapter_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == \
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert strip_adapter_name("base_model.model.score.modules_to_save.default.weight") == "base_model.model.score.weight"


# ------------------------------------------------------------------------------------------- plan


def test_a_lora_plan_has_no_reference_actor_and_says_who_computes_the_reference() -> None:
    full = plan_actors(load_config(GRPO, ["rollout.backend=vllm"]))
    assert [a.name for a in full.of("reference")] == ["reference"]
    cfg = load_config(GRPO, ["rollout.backend=vllm", "model.lora.rank=8"])
    plan = check_plan(cfg)
    assert plan.of("reference") == []
    assert "also the reference: this model with its adapter off, no second copy of the weights" in plan.of("policy")[0].path
    assert "LoRA adapter only (rank 8) into vLLM's LoRA slots" in plan.weight_sync
    assert "serving the LoRA adapter" in plan.of("rollout")[0].path
    # another reference model is still served by a reference actor; no KL needs no reference at all
    assert plan_actors(load_config(GRPO, ["model.lora.rank=8", "model.reference=tiny:qwen2"])).of("reference")
    assert "also the reference" not in plan_actors(load_config(GRPO, ["model.lora.rank=8", "algorithm.kl_coef=0"])).of("policy")[0].path


@pytest.mark.parametrize(("overrides", "expected", "problem"), [
    (["rollout.backend=vllm"], "adapter", None),
    (["rollout.backend=hf"], "merged", None),
    (["rollout.backend=vllm", "model.policy=tiny:qwen3-moe"], "merged", None),  # vLLM CPU: no LoRA on MoE models
    (["rollout.backend=vllm", "model.lora.sync=merged"], "merged", None),
    (["rollout.backend=hf", "model.lora.sync=adapter"], "adapter", "needs rollout.backend: vllm"),
    (["rollout.backend=vllm", "model.policy=tiny:mixtral", "model.lora.sync=adapter"], "adapter", "Triton kernels"),
])
def test_the_sync_mode_is_resolved_by_what_the_engines_can_serve(overrides: list[str], expected: str, problem: str | None) -> None:
    cfg = load_config(GRPO, ["model.lora.rank=8", *overrides])
    sync, why = resolve_lora_sync(cfg)
    assert sync == expected
    if problem is None:
        assert why is None
        check_plan(cfg)
    else:
        assert problem in why
        with pytest.raises(ConfigError, match="model.lora.sync"):
            check_plan(cfg)


def test_engines_get_lora_arguments_only_for_an_adapter_sync() -> None:
    from vllm import EngineArgs

    cfg = load_config(GRPO, ["rollout.backend=vllm", "model.lora.rank=8", "model.lora.sync=adapter"])
    kwargs = _engine_kwargs("vllm", "/m", cfg.rollout, cfg.model, 0, 64)
    assert kwargs["lora"]["rank"] == 8
    cfg.model.lora.sync = "merged"
    assert _engine_kwargs("vllm", "/m", cfg.rollout, cfg.model, 0, 64)["lora"] is None
    from rayrlhf.actors.vllm_lora import LoraSlot  # the engine arguments it adds are ones vLLM takes

    slot = LoraSlot.__new__(LoraSlot)
    slot.rank, slot.targets = 12, DENSE
    args = EngineArgs(model="/m", **slot.engine_args())
    assert (args.enable_lora, args.max_lora_rank, args.lora_target_modules) == (True, 16, DENSE)


def test_probe_helpers() -> None:
    assert probe_ids([[1, 2, 3], [4, 5]], 4) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="at least 2 tokens"):
        probe_ids([[1]])
    assert probe_atol(None, "float32") == 1e-3 and probe_atol(None, "bfloat16") == 0.1 and probe_atol(0.5, "float32") == 0.5


def test_a_lora_final_folder_is_refused_as_a_model_with_the_way_to_merge_it(tmp_path: Path) -> None:
    from rayrlhf.errors import InvalidInput
    from rayrlhf.orchestrator.offline import OfflineTrainer

    final = tmp_path / "sft" / "final"
    final.mkdir(parents=True)
    (final / "adapter_config.json").write_text("{}")
    cfg = load_config(ROOT / "cluster_configs/local-cpu/sft.yaml", [f"model.policy={final}", f"output_dir={tmp_path / 'next'}"])
    with pytest.raises(InvalidInput, match=rf"model.policy: {final} holds a LoRA adapter, not a model; merge it into its "
                                           rf"base first with `rayrlhf export {tmp_path / 'sft'} --merge`"):
        OfflineTrainer(cfg)

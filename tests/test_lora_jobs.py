"""LoRA jobs end to end on CPU: real Ray, vLLM (its CPU LoRA kernels) and DeepSpeed on tiny models.

- GRPO with a LoRA policy: no reference actor (the policy computes the reference with its adapter off),
  only the adapter syncs, verified every step (read back from vLLM's LoRA layers and a log-prob probe);
  a checkpoint holds the adapter and its optimizer state only; final/ is a peft adapter; `rayrlhf export
  --merge` writes a model that loads in transformers and vLLM with the trainer's log-probs, and a
  checkpoint exports to the same weights as final/;
- resume is exact: 4 steps straight equal 2, stop, --resume, 2 more (2 ranks, ZeRO-3; the adapter broadcast
  over the gloo weight group);
- an adapter sync into a tensor-parallel engine is verified piece by piece, and a corrupted tensor is named;
- SFT (and export --step of a full fine-tune), DPO (reference = the adapter switched off) and a
  reward model (its new score head trains whole beside the adapter) with LoRA.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch
from jobs import ROOT
from safetensors.torch import load_file

from rayrlhf.config import load_config
from rayrlhf.launch.export import export
from rayrlhf.launch.run import run_job
from rayrlhf.models.forward import pack_batch, sequence_scores, token_logprobs
from rayrlhf.orchestrator.metrics import read_metrics

pytestmark = pytest.mark.slow
CONFIGS = ROOT / "cluster_configs" / "local-cpu"
LORA = ("model.lora.rank=8", "model.lora.alpha=16", "rollout.backend=vllm", "schedule.verify_sync_every=1",
        "data.eval=null", "schedule.prompts_per_step=4", "rollout.dtype=float32")


def _online(tmp: Path, name: str, *overrides: str, resume: bool = False, inspect=None) -> list[dict]:
    from rayrlhf.orchestrator.online import OnlineRL
    from rayrlhf.orchestrator.preflight import preflight

    cfg = load_config(CONFIGS / "grpo.yaml", [f"output_dir={tmp / name}", *LORA, *overrides])
    if resume:
        run_job(cfg, resume=True)
    else:
        job = OnlineRL(cfg, checked=preflight(cfg))
        try:
            if inspect is not None:
                inspect(job)
            job.run()
        finally:
            job.system.shutdown()
    return read_metrics(tmp / name / "metrics.jsonl")


def _tensors(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(folder / name)


def test_grpo_with_lora_syncs_the_adapter_verified_and_exports(ray_local: None, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    seen = {}

    def inspect(job) -> None:
        system = job.system
        seen["reference_actor"] = system.reference
        seen["in_policy"] = system.reference_in_policy
        seen["adapter_bytes"] = sum(torch.Size(s).numel() * 4 for _, s, _ in system.policy.weight_layout("float32")[0])

    rows = _online(tmp_path, "grpo", "schedule.steps=4", "checkpoint.every=2", "trainer.policy.lr=3e-2", inspect=inspect)
    out = tmp_path / "grpo"
    assert seen["reference_actor"] is None and seen["in_policy"]
    base = out / ".models" / "tiny-model"
    full_bytes = sum(t.numel() * 4 for t in _tensors(base).values())
    assert seen["adapter_bytes"] * 4 < full_bytes  # the sync: rank 8 on a width-64 model (bench/lora.py: a 75M one)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["kl/mean"] < 1e-6 < rows[-1]["kl/mean"]  # a fresh adapter is the base; then the policy moves away
    assert max(r["rollout/logprob_mismatch"] for r in rows) < 1e-4  # the engines sample with the trainer's adapter

    # a checkpoint: the adapter and its optimizer state, nothing of the frozen base
    state = torch.load(out / "checkpoints/step_2/policy/state/mp_rank_00_model_states.pt", weights_only=False)
    adapter = [k for k in state["module"]]
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert len(state["optimizer"]["state"]) == len(adapter)  # ZeRO-0: torch AdamW's state, one per adapter tensor

    # final/: peft's format, loadable on the base model
    config = json.loads((out / "final/adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 8, 16)
    files = _tensors(out / "final", "adapter_model.safetensors")
    assert all(n.startswith("base_model.model.model.layers.") and n.endswith((".lora_A.weight", ".lora_B.weight")) for n in files)
    batch = pack_batch([[5, 6, 7, 8], [9, 10]], [[20, 21, 22], [23, 24, 25]], 0)
    with torch.no_grad():
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out / "final")
        expected = token_logprobs(peft.eval(), batch)[0]
        base_logp = token_logprobs(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval(), batch)[0]
    assert (expected - base_logp).abs().max() > 1e-3  # the adapter learned something

    merged = export(out, merge=True)
    assert merged == out / "merged" and not (merged / "adapter_config.json").exists()
    with torch.no_grad():
        got = token_logprobs(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval(), batch)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    last = export(out, step=4, merge=True)  # the last checkpoint is the final model, to the bit
    assert last == out / "export" / "step_4-merged"
    final_tensors, step_tensors = _tensors(merged), _tensors(last)
    assert sorted(final_tensors) == sorted(step_tensors)
    assert all(torch.equal(final_tensors[k], step_tensors[k]) for k in final_tensors)
    assert sorted(_tensors(export(out, step=2), "adapter_model.safetensors")) == sorted(files)  # an adapter again

    # the merged model serves in vLLM with the same log-probs
    from rayrlhf.actors.rollout import create_rollout_workers
    from rayrlhf.actors.types import GenerationRequest, SamplingSpec
    from rayrlhf.config import ModelConfig, RolloutConfig
    from rayrlhf.orchestrator.workers import collect

    [worker] = create_rollout_workers(merged, RolloutConfig(backend="vllm", num_workers=1, num_cpus=0.5, dtype="float32"),
                                      ModelConfig(dtype="float32"), seed=0, max_prompt_tokens=32, name_prefix="lora-merged")
    try:
        ids = [5, 6, 7, 8, 20, 21, 22]
        spec = SamplingSpec(temperature=1.0, max_new_tokens=1, seed=0, prompt_logprobs=True)
        [probe] = collect(worker, [GenerationRequest("merged", ids, spec)])
        with torch.no_grad():
            trainer = token_logprobs(peft, pack_batch([ids[:1]], [ids[1:]], 0))[0][0]
        assert (torch.tensor(probe.prompt_logprobs) - trainer).abs().max() < 1e-3
    finally:
        ray.kill(worker)


def test_lora_resume_reproduces_the_run(ray_local: None, tmp_path: Path) -> None:
    common = ("trainer.policy.num_ranks=2", "trainer.zero_stage=3", "trainer.micro_batch_size=4", "checkpoint.every=2",
              "algorithm.group_size=4", "trainer.policy.lr=3e-2", "servers.weight_sync_backend=collective")
    straight = _online(tmp_path, "straight", "schedule.steps=4", *common)
    _online(tmp_path, "resumed", "schedule.steps=2", *common)
    assert (tmp_path / "resumed/checkpoints/latest").read_text().strip() == "step_2"
    resumed = _online(tmp_path, "resumed", "schedule.steps=4", *common, resume=True)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed, strict=True):
        for key in ("reward/mean", "kl/mean", "response/length_mean", "policy/loss", "policy/grad_norm",
                    "rollout/logprob_mismatch"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert straight[-1]["kl/mean"] > 0
    one = _tensors(tmp_path / "straight/final", "adapter_model.safetensors")
    two = _tensors(tmp_path / "resumed/final", "adapter_model.safetensors")
    assert all(torch.equal(one[k], two[k]) for k in one)


# ------------------------------------------------------------------------------------------- offline


def _offline(config: str, out: Path, *overrides: str) -> list[dict]:
    run_job(load_config(CONFIGS / config, [f"output_dir={out}", *overrides]))
    return read_metrics(out / "metrics.jsonl")


def test_sft_with_lora_and_export_of_checkpoints(ray_local: None, tmp_path: Path) -> None:
    """A LoRA SFT run learns with the adapter only; a full fine-tune's checkpoint (2 ranks, ZeRO-2: sharded
    optimizer state) exports to exactly its final/ weights."""
    short = ("schedule.steps=12", "schedule.eval_every=12", "checkpoint.every=12", "trainer.mini_batch_size=32")
    rows = _offline("sft.yaml", tmp_path / "lora", *short, "model.lora.rank=8", "trainer.policy.lr=2e-2")
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert evals[-1] < evals[0] - 0.3
    assert (tmp_path / "lora/final/adapter_model.safetensors").is_file()
    assert not (tmp_path / "lora/final/model.safetensors").exists()

    full = tmp_path / "full"
    _offline("sft.yaml", full, *short, "trainer.policy.num_ranks=2", "trainer.zero_stage=2")
    exported = export(full, step=12)
    final, step = _tensors(full / "final"), _tensors(exported)
    assert sorted(final) == sorted(step)
    for name in final:
        torch.testing.assert_close(step[name], final[name], atol=0, rtol=0)


def test_dpo_with_lora_takes_the_reference_from_the_adapter_switched_off(ray_local: None, tmp_path: Path) -> None:
    """The implicit rewards β·log(π/π_ref) the job reports are those of the trained adapter against the plain base
    model: the reference is the policy with its adapter off, not a second model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rayrlhf.algorithms import sequence_logprob
    from rayrlhf.data.examples import load_examples
    from rayrlhf.models.loading import load_tokenizer

    out = tmp_path / "dpo"
    rows = _offline("dpo.yaml", out, "schedule.steps=15", "schedule.eval_every=15", "checkpoint.every=0",
                    "model.lora.rank=8", "trainer.policy.lr=1e-2", "trainer.mini_batch_size=32",
                    "trainer.policy.warmup_steps=0")
    evals = [r for r in rows if "eval/accuracy" in r]
    assert abs(evals[0]["eval/margin"]) < 1e-6  # step 0: the policy is the reference (its adapter is the identity)
    assert rows[1]["train/loss"] == pytest.approx(0.6931, abs=1e-3)  # the first update starts at log 2
    assert evals[-1]["eval/margin"] > 0 and evals[-1]["eval/accuracy"] > evals[0]["eval/accuracy"]

    cfg = load_config(out / "config.yaml")
    base_path = out / ".models" / "tiny-model"
    tok = load_tokenizer(base_path)
    pairs, _ = load_examples(cfg.data.eval, "pairs", tok, cfg.data)
    batch = pack_batch([e.prompt_ids for e in pairs], [e.responses[0] for e in pairs], tok.pad_token_id)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
        ref = sequence_logprob(token_logprobs(base, batch)[0], batch["mask"])
        policy = PeftModel.from_pretrained(base, out / "final").eval()
        logp = sequence_logprob(token_logprobs(policy, batch)[0], batch["mask"])
    chosen_reward = float((cfg.algorithm.beta * (logp - ref)).mean())
    assert chosen_reward == pytest.approx(evals[-1]["eval/chosen_reward"], abs=1e-5)
    assert abs(chosen_reward) > 1e-3


def test_reward_model_with_lora_trains_its_head_and_merges_into_a_classifier(ray_local: None, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from rayrlhf.data.examples import load_examples
    from rayrlhf.models.loading import load_tokenizer

    out = tmp_path / "rm"
    rows = _offline("rm.yaml", out, "schedule.steps=20", "schedule.eval_every=20", "checkpoint.every=0",
                    "model.lora.rank=8", "trainer.policy.lr=1e-2", "trainer.mini_batch_size=32")
    evals = [r for r in rows if "eval/accuracy" in r]
    assert evals[-1]["eval/accuracy"] > evals[0]["eval/accuracy"]
    files = _tensors(out / "final", "adapter_model.safetensors")
    assert "base_model.model.score.weight" in files  # the new head trains whole and is saved with the adapter
    merged = export(out, merge=True)
    model = AutoModelForSequenceClassification.from_pretrained(merged, dtype=torch.float32).eval()
    cfg = load_config(out / "config.yaml")
    tok = load_tokenizer(merged)
    pairs, _ = load_examples(cfg.data.eval, "pairs", tok, cfg.data)
    with torch.no_grad():
        scores = [sequence_scores(model, pack_batch([e.prompt_ids for e in pairs], [e.responses[i] for e in pairs],
                                                    tok.pad_token_id)) for i in (0, 1)]
    accuracy = float((scores[0] > scores[1]).float().mean())
    assert accuracy == pytest.approx(evals[-1]["eval/accuracy"], abs=1e-9)  # the merged model is the trained one


# ------------------------------------------------------------------------------------------- actors


def test_adapter_sync_into_a_tensor_parallel_engine_is_verified_piece_by_piece(ray_local: None, tmp_path: Path) -> None:
    """Mistral (one k/v head, replicated over 2 ranks) into a tensor-parallel-2 vLLM worker: each rank's adapter
    pieces are read back by region and compared; a stale engine fails both the tensors and the probe; a corrupted
    tensor is named."""
    from rayrlhf.actors.rollout import create_rollout_workers
    from rayrlhf.actors.trainer import TrainerSettings
    from rayrlhf.actors.trainer_group import TrainerGroup
    from rayrlhf.actors.weight_sync import WeightSyncError, broadcast_weights, verify_weights
    from rayrlhf.config import LoraConfig, ModelConfig, RolloutConfig
    from rayrlhf.models.architectures import build_architecture
    from rayrlhf.models.lora import lora_spec
    from rayrlhf.orchestrator.lora_sync import verify_adapter_logprobs

    path = build_architecture("mistral", tmp_path / "mistral")
    lora = LoraConfig(rank=8, sync="adapter")
    settings = TrainerSettings(zero_stage=3, micro_batch_size=4, lr=1e-2, dtype="float32", lora=lora_spec(lora))
    group = TrainerGroup("policy", str(path), settings, num_ranks=1, num_cpus=0.5, name_prefix="lora-tp")
    rollout = RolloutConfig(backend="vllm", num_workers=1, num_cpus=0.5, dtype="float32", tensor_parallel_size=2)
    [worker] = create_rollout_workers(path, rollout, ModelConfig(dtype="float32", lora=lora), seed=0,
                                      max_prompt_tokens=32, name_prefix="lora-tp-rollout")
    try:
        batch = pack_batch([[5, 6, 7, 8], [9, 10, 11, 12]], [[20, 21, 22, 23]] * 2, 0)
        ids = [5, 6, 7, 8, 20, 21, 22, 23, 24, 25]
        meta, aliases = group.weight_layout("float32")
        assert aliases == {} and all(".lora_A." in n or ".lora_B." in n for n, _, _ in meta)
        for _ in range(2):
            group.train_step(batch, "sft", {})
        result = broadcast_weights(group, [worker], 1, 1 << 20, "float32")
        assert result.synced == [0]
        pieces = ray.get(worker.checksums.remote([n for n, _, _ in meta]))
        held: dict[str, int] = {}
        for name, _ in pieces:
            held[name] = held.get(name, 0) + 1
        assert set(held) == {n for n, _, _ in meta} and max(held.values()) == 2  # row-parallel lora_A: one half per rank
        verify_weights(group, [worker], "float32")
        assert verify_adapter_logprobs(group, [worker], ids, 0, 1e-3, version=1) == {}

        group.train_step(batch, "sft", {})  # the trainer moves on; the engine keeps version 1
        with pytest.raises(WeightSyncError, match=r"lora_B\.weight.*: differs from the trainer"):
            verify_weights(group, [worker], "float32")
        with pytest.raises(WeightSyncError, match="its log-probs on the probe differ from the trainer's by up to"):
            verify_adapter_logprobs(group, [worker], ids, 0, 1e-3, version=1)

        refs = list(group.iter_weight_buckets(1 << 20, "float32"))
        group.finish_weight_stream()
        target = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"
        bad = [(n, a + 0.5 if n == target else a) for bucket in ray.get(refs) for n, a in bucket]
        ray.get(worker.begin_weight_update.remote({}))
        ray.get(worker.load_weights.remote(bad))
        ray.get(worker.finish_weight_update.remote(2))
        with pytest.raises(WeightSyncError) as info:
            verify_weights(group, [worker], "float32")
        assert "1 tensor(s) differ" in str(info.value) and target in str(info.value)
        broadcast_weights(group, [worker], 3, 1 << 20, "float32")  # a sync repairs it
        verify_weights(group, [worker], "float32")
        assert verify_adapter_logprobs(group, [worker], ids, 0, 1e-3, version=3) == {}
    finally:
        group.shutdown()
        ray.kill(worker)

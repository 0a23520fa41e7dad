"""DeepSpeed trainer groups on real Ray with the tiny model: forward passes, exact loss
normalisation, checkpoints, PPO / value / Bradley-Terry steps and weight streaming/export.

The ZeRO-3 policy group is shared by the module; tests that train it run after those that need
its initial weights (file order), and the exactness test checks that it is still untrained.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from rayrlhf.actors.losses_step import count_units, plan_passes, validate
from rayrlhf.actors.trainer import TrainerSettings, lr_lambda
from rayrlhf.actors.trainer_group import TrainerGroup, trainer_settings
from rayrlhf.actors.weights import tensor_checksum, whole_checksums
from rayrlhf.algorithms import (
    AGG_MODES,
    aggregate_loss,
    gspo_policy_loss,
    kl_estimate,
    ppo_policy_loss,
    sequence_importance_weights,
    sequence_logprob,
    sft_nll_loss,
)
from rayrlhf.config import JobConfig
from rayrlhf.models.forward import pack_batch, sequence_scores, token_logprobs
from rayrlhf.models.loading import load_policy, load_reward_model, load_tokenizer

LR = 1e-3


def random_batch(seed: int, rows: int, vocab: int, prompt_lens: list[int], response_lens: list[int]) -> dict:
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(4, vocab, (prompt_lens[i % len(prompt_lens)],), generator=gen).tolist() for i in range(rows)]
    responses = [torch.randint(4, vocab, (response_lens[i % len(response_lens)],), generator=gen).tolist()
                 for i in range(rows)]
    return pack_batch(prompts, responses, pad_id=0)


def stream_state(group: TrainerGroup, bucket_bytes: int = 64 * 1024) -> dict[str, torch.Tensor]:
    """The group's full weights through the streaming protocol (small buckets: several of them)."""
    state: dict[str, torch.Tensor] = {}
    buckets = 0
    for ref in group.iter_weight_buckets(bucket_bytes):
        buckets += 1
        for name, array in ray.get(ref):
            assert name not in state
            state[name] = torch.from_numpy(np.array(array))
    group.finish_weight_stream()
    assert buckets > 1
    return state


@pytest.fixture(scope="module")
def vocab(tiny_model: Path) -> int:
    return len(load_tokenizer(tiny_model))


@pytest.fixture(scope="module")
def policy3(tiny_model: Path, ray_local: None, tmp_path_factory: pytest.TempPathFactory):
    settings = TrainerSettings(zero_stage=3, micro_batch_size=2, lr=LR, lr_schedule="linear", total_steps=50,
                               max_grad_norm=1.0, dtype="float32")
    group = TrainerGroup("policy", str(tiny_model), settings, num_ranks=2, name_prefix="test-policy3")
    group.fresh = str(tmp_path_factory.mktemp("fresh"))  # the untrained state: tests that need it load it
    group.save_checkpoint(group.fresh, "fresh")
    yield group
    group.shutdown()


def fresh(group: TrainerGroup) -> TrainerGroup:
    """The group back at its untrained weights, optimizer and LR schedule, whatever ran before."""
    group.load_checkpoint(group.fresh, "fresh")
    return group


def test_settings_follow_the_job_config() -> None:
    cfg = JobConfig.model_validate({
        "algorithm": {"name": "grpo", "group_size": 4}, "reward": {"function": "x.py:f"}, "data": {"train": "p.jsonl"},
        "schedule": {"prompts_per_step": 8}, "trainer": {"micro_batch_size": 2, "mini_batch_size": 16,
                                                         "policy": {"num_ranks": 2, "lr": 3e-6, "warmup_steps": 2}},
    })
    s = trainer_settings(cfg, "policy", total_steps=20)
    assert (s.gradient_accumulation_steps, s.micro_batch_size, s.lr, s.total_steps) == (4, 2, 3e-6, 20)
    fn = lr_lambda(TrainerSettings(warmup_steps=2, total_steps=6, lr_schedule="linear"))
    assert [round(fn(i), 3) for i in range(7)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    cos = lr_lambda(TrainerSettings(total_steps=4, lr_schedule="cosine"))
    assert cos(0) == 1.0 and math.isclose(cos(2), 0.5, abs_tol=1e-12)


def fake_forward(packed: dict, with_entropy: bool, temperature: float) -> dict:
    """A deterministic stand-in for the model: each token's log-prob depends on its id only."""
    t_len = packed["mask"].shape[1]
    return {"logp": -(torch.sin(packed["input_ids"][:, -t_len:].float()) + 1.5) * packed["mask"] / temperature}


def sharded_loss(loss: str, batch: dict, args: dict, ranks: int, micro: int) -> float:
    """Sum of every pass's contribution over simulated ranks, as the trainer ranks compute it."""
    shards = [{k: v.tensor_split(ranks)[r] for k, v in batch.items()} for r in range(ranks)]
    totals: dict[str, float] = {}
    for shard in shards:
        for k, v in count_units(loss, shard, args).items():
            totals[k] = totals.get(k, 0.0) + v
    return sum(float(p(fake_forward, totals).loss) for shard in shards for p in plan_passes(loss, shard, args, micro))


@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batch_shares_add_up_to_the_global_loss(agg: str) -> None:
    batch = random_batch(7, 8, 60, prompt_lens=[2, 3], response_lens=[1, 6, 2, 5, 3, 6, 1, 2])
    batch["mask"][3] = 0  # an empty response must not dilute the sequence means
    logp = fake_forward(batch, False, 1.0)["logp"]
    want = sft_nll_loss(logp, batch["mask"], agg)
    assert sharded_loss("sft", batch, {"agg": agg}, ranks=2, micro=3) == pytest.approx(float(want), rel=1e-6)

    ptx = random_batch(8, 6, 60, prompt_lens=[1], response_lens=[5, 2, 7])
    old = logp + 0.1 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(0))
    ppo = batch | {"old_logp": old, "ref_logp": old - 0.05, "advantages": torch.linspace(-1, 1, 8)}
    ppo |= {f"ptx_{k}": v for k, v in ptx.items()}
    args = {"agg": agg, "kl_coef": 0.1, "kl_estimator": "k3", "ptx_coef": 0.5, "clip_eps": 0.05}
    pg, _ = ppo_policy_loss(logp, old, ppo["advantages"], batch["mask"], clip_eps=0.05, agg=agg)
    kl = aggregate_loss(kl_estimate(logp, ppo["ref_logp"], "k3"), batch["mask"], agg)
    nll = sft_nll_loss(fake_forward(ptx, False, 1.0)["logp"], ptx["mask"])
    want = pg + 0.1 * kl + 0.5 * nll
    assert sharded_loss("ppo", ppo, args, ranks=2, micro=3) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("policy_loss", ["gspo", "gspo_token"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_gspo_micro_batch_shares_add_up_to_the_global_loss(agg: str, policy_loss: str) -> None:
    """GSPO's per-sequence terms (and sequence importance weights of stale samples) split over ranks and
    micro-batches like PPO's: the passes add up to the loss of the whole mini-batch."""
    batch = random_batch(7, 8, 60, prompt_lens=[2, 3], response_lens=[1, 6, 2, 5, 3, 6, 1, 2])
    batch["mask"][3] = 0
    logp = fake_forward(batch, False, 1.0)["logp"]
    gen = torch.Generator().manual_seed(1)
    old = logp + 0.01 * torch.randn(logp.shape, generator=gen)
    sample = old + 0.3 * torch.randn(logp.shape, generator=gen)
    adv = torch.linspace(-1, 1, 8)
    ppo = batch | {"old_logp": old, "sample_logp": sample, "advantages": adv}
    args = {"agg": agg, "clip_eps": 0.002, "clip_eps_high": 0.003, "policy_loss": policy_loss, "is_cap": 1.2}
    if agg == "seq-mean-token-sum-norm":
        args["agg_constant"] = 6.0
    weights, _ = sequence_importance_weights(old, sample, batch["mask"], 1.2)
    want, _ = gspo_policy_loss(logp, old, adv, batch["mask"], 0.002, 0.003, agg=agg, agg_constant=args.get("agg_constant"),
                               weights=weights, token_level=policy_loss == "gspo_token")
    # terms of size ~1 cancel to ~0.03: float32 rounding of the sum is ~1e-7 absolute
    assert sharded_loss("ppo", ppo, args, ranks=2, micro=3) == pytest.approx(float(want), rel=1e-6, abs=2e-7)
    with pytest.raises(ValueError, match="unknown policy_loss 'gpso'"):
        validate("ppo", ppo, {**args, "policy_loss": "gpso"})


def test_zero3_logprobs_match_a_single_process(policy3: TrainerGroup, tiny_model: Path, vocab: int) -> None:
    batch = random_batch(1, 6, vocab, prompt_lens=[3, 5, 1], response_lens=[4, 2, 6, 1])
    out = policy3.forward_logprobs(batch, with_entropy=True)
    reference = load_policy(tiny_model, dtype="float32").eval()
    reference.load_state_dict(stream_state(policy3))
    with torch.no_grad():
        logp, entropy = token_logprobs(reference, batch, with_entropy=True)
    assert out["logp"].shape == batch["mask"].shape
    torch.testing.assert_close(out["logp"], logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["entropy"], entropy, atol=1e-5, rtol=0)
    odd = random_batch(1, 3, vocab, [2], [2])  # 3 rows on 2 ranks: padded with a repeated row, then cut off
    with torch.no_grad():
        expected, _ = token_logprobs(reference, odd)
    torch.testing.assert_close(policy3.forward_logprobs(odd)["logp"], expected, atol=1e-5, rtol=0)


def test_weight_stream_is_the_hf_state_dict(policy3: TrainerGroup, tiny_model: Path) -> None:
    streamed = stream_state(fresh(policy3))
    expected = load_policy(tiny_model, dtype="float32").state_dict()
    assert sorted(streamed) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(streamed[name], tensor), name
    assert {n: tensor_checksum(t) for n, t in streamed.items()} == whole_checksums(policy3.checksums())


def test_accumulated_step_equals_a_full_batch_step(policy3: TrainerGroup, tiny_model: Path, vocab: int) -> None:
    """2 ranks x 2 micro-batches with uneven token counts == one single-process AdamW step on all 8 rows."""
    fresh(policy3)  # a fresh optimizer and LR schedule
    batch = random_batch(2, 8, vocab, prompt_lens=[2, 4, 3], response_lens=[1, 6, 2, 5, 3, 6, 1, 2])
    model = load_policy(tiny_model, dtype="float32")
    model.load_state_dict(stream_state(policy3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    loss = sft_nll_loss(token_logprobs(model, batch)[0], batch["mask"])
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    optimizer.step()

    metrics = policy3.train_step(batch, "sft", {})
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert metrics["grad_norm"] == pytest.approx(float(norm), rel=1e-5)
    assert metrics["lr"] == pytest.approx(LR)
    after = stream_state(policy3)
    for name, tensor in model.state_dict().items():
        # Adam's first step moves each weight by about LR; it normalises every gradient element, so
        # summation-order rounding in near-zero gradients shows up as ~0.2% of LR (2.3e-6 seen).
        # 2% of LR keeps a 9x margin; the loss and grad-norm checks above catch normalisation errors.
        torch.testing.assert_close(after[name], tensor, atol=0.02 * LR, rtol=0, msg=name)


def test_weight_stream_follows_training(policy3: TrainerGroup, tiny_model: Path, vocab: int) -> None:
    fresh(policy3).train_step(random_batch(4, 4, vocab, prompt_lens=[3], response_lens=[4]), "sft", {})
    streamed = stream_state(policy3)
    sums = whole_checksums(policy3.checksums())
    assert {n: tensor_checksum(t) for n, t in streamed.items()} == sums
    original = {n: tensor_checksum(t) for n, t in load_policy(tiny_model, dtype="float32").state_dict().items()}
    assert sums.keys() == original.keys()
    assert all(sums[n] != original[n] for n in sums)


def test_export_hf_loads_with_transformers(policy3: TrainerGroup, tmp_path: Path) -> None:
    policy3.export_hf(str(tmp_path / "hf"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert {n: tensor_checksum(t) for n, t in model.state_dict().items()} == whole_checksums(policy3.checksums())
    assert load_tokenizer(tmp_path / "hf").pad_token_id == 0


def test_checkpoint_resumes_exactly(policy3: TrainerGroup, tmp_path: Path, vocab: int) -> None:
    batch = random_batch(3, 4, vocab, prompt_lens=[3, 2], response_lens=[3, 5, 2, 4])
    policy3.save_checkpoint(str(tmp_path / "ckpt"), "t1")
    for rank in (0, 1):  # the ranks' RNG states are tensors and plain values: no pickled code runs on load
        torch.load(tmp_path / "ckpt" / "t1" / f"rng_rank{rank}.pt", weights_only=True)
    first = [policy3.train_step(batch, "sft", {}) for _ in range(2)]
    policy3.load_checkpoint(str(tmp_path / "ckpt"), "t1")
    again = [policy3.train_step(batch, "sft", {}) for _ in range(2)]
    for a, b in zip(first, again, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-6
        assert a["lr"] == b["lr"] and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
    assert first[1]["lr"] < first[0]["lr"]  # the linear schedule moved, and was restored with the checkpoint


def test_ppo_with_kl_and_ptx_reduces_its_loss(policy3: TrainerGroup, vocab: int) -> None:
    batch = random_batch(4, 4, vocab, prompt_lens=[3, 2], response_lens=[3, 5, 2, 4])
    old = policy3.forward_logprobs(batch)["logp"]
    ptx = random_batch(5, 2, vocab, prompt_lens=[1], response_lens=[6, 4])
    batch |= {"old_logp": old, "ref_logp": old.clone(), "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5])}
    batch |= {f"ptx_{k}": v for k, v in ptx.items()}
    args = {"clip_eps": 0.2, "kl_coef": 0.05, "kl_estimator": "k3", "ptx_coef": 0.1}
    with pytest.raises(ValueError, match="unknown loss_args"):
        policy3.train_step(batch, "ppo", {"clip_epsilon": 0.2})
    with pytest.raises(ValueError, match="trains a critic"):
        policy3.train_step(batch, "value", {})
    steps = [policy3.train_step(batch, "ppo", args) for _ in range(4)]
    assert {"clipfrac", "approx_kl", "entropy", "kl", "ptx_loss", "grad_norm", "lr"} <= steps[0].keys()
    assert steps[0]["approx_kl"] == pytest.approx(0.0, abs=1e-6) and steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert steps[-1]["approx_kl"] > 0


def test_dpo_steps_prefer_the_chosen_responses(policy3: TrainerGroup, vocab: int) -> None:
    chosen = random_batch(9, 4, vocab, prompt_lens=[3, 2], response_lens=[3, 5, 2, 4])
    rejected = random_batch(10, 4, vocab, prompt_lens=[3, 2], response_lens=[2, 4])
    ref = [sequence_logprob(policy3.forward_logprobs(b, temperature=1.0)["logp"], b["mask"]) for b in (chosen, rejected)]
    batch = {f"chosen_{k}": v for k, v in chosen.items()} | {f"rejected_{k}": v for k, v in rejected.items()}
    batch |= {"ref_chosen_logp": ref[0], "ref_rejected_logp": ref[1]}
    steps = [policy3.train_step(batch, "dpo", {"beta": 0.5}) for _ in range(3)]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy is its own reference
    assert steps[-1]["loss"] < steps[0]["loss"] and steps[-1]["margin"] > 0 and steps[-1]["accuracy"] > 0.5


@pytest.mark.parametrize("no_dropout", [True, False])
def test_on_policy_ppo_ratio_is_exactly_one_with_dropout_in_the_config(
    ray_local: None, tmp_path: Path, vocab: int, no_dropout: bool
) -> None:
    """Old log-probs are computed in eval mode, the update runs in train mode: with the config's dropout
    switched off (model.disable_dropout, the default) every ratio of the first step is exactly 1."""
    from rayrlhf.models.architectures import build_architecture

    path = build_architecture("qwen2", tmp_path / "dropout", attention_dropout=0.3)
    settings = TrainerSettings(zero_stage=2, micro_batch_size=4, lr=1e-3, dtype="float32", disable_dropout=no_dropout)
    group = TrainerGroup("policy", str(path), settings, num_ranks=1, name_prefix=f"test-dropout-{no_dropout}")
    try:
        batch = random_batch(8, 4, vocab, prompt_lens=[3, 2], response_lens=[4, 6])
        batch |= {"old_logp": group.forward_logprobs(batch)["logp"], "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5])}
        metrics = group.train_step(batch, "ppo", {})
        assert (metrics["approx_kl"] == 0.0 and metrics["clipfrac"] == 0.0) is no_dropout, metrics
    finally:
        group.shutdown()


def test_critic_value_steps_reduce_the_loss(tiny_model: Path, ray_local: None, vocab: int) -> None:
    settings = TrainerSettings(zero_stage=2, micro_batch_size=1, lr=3e-3, dtype="float32")
    critic = TrainerGroup("critic", str(tiny_model), settings, num_ranks=2, name_prefix="test-critic")
    try:
        batch = random_batch(6, 4, vocab, prompt_lens=[3, 2], response_lens=[3, 5, 2, 4])
        old = critic.forward_values(batch)
        assert old.shape == batch["mask"].shape
        returns = torch.linspace(-1, 1, 4).unsqueeze(1).expand_as(old) * batch["mask"]
        batch |= {"old_values": old, "returns": returns}
        steps = [critic.train_step(batch, "value", {"value_clip_eps": 10.0}) for _ in range(5)]
        assert "vf_clipfrac" in steps[0]
        assert steps[-1]["loss"] < 0.5 * steps[0]["loss"]
    finally:
        critic.shutdown()


def test_reward_model_learns_a_separable_preference(tiny_model: Path, ray_local: None) -> None:
    tok = load_tokenizer(tiny_model)
    rng = np.random.default_rng(0)
    prompts = [tok("".join(rng.choice(list("abcdefgh"), 3)), add_special_tokens=False)["input_ids"] for _ in range(8)]
    good = [tok("a" * int(n), add_special_tokens=False)["input_ids"] for n in rng.integers(2, 5, 8)]
    bad = [tok("z" * int(n), add_special_tokens=False)["input_ids"] for n in rng.integers(2, 5, 8)]
    rm = load_reward_model(tiny_model, dtype="float32").eval()
    with torch.no_grad():  # label the pairs against the untrained model's taste, so accuracy has room to rise
        a_wins = (sequence_scores(rm, pack_batch(prompts, good, 0)) > sequence_scores(rm, pack_batch(prompts, bad, 0)))
    if a_wins.float().mean() > 0.5:
        good, bad = bad, good
    chosen, rejected = pack_batch(prompts, good, 0), pack_batch(prompts, bad, 0)
    batch = {f"chosen_{k}": v for k, v in chosen.items()} | {f"rejected_{k}": v for k, v in rejected.items()}

    settings = TrainerSettings(zero_stage=0, micro_batch_size=2, lr=5e-3, dtype="float32")
    reward = TrainerGroup("reward", str(tiny_model), settings, num_ranks=2, name_prefix="test-reward")
    try:
        def accuracy() -> float:
            return float((reward.forward_scores(chosen) > reward.forward_scores(rejected)).float().mean())

        before = accuracy()
        steps = [reward.train_step(batch, "bt", {}) for _ in range(12)]
        assert before <= 0.5
        assert steps[0]["accuracy"] == pytest.approx(before)
        assert accuracy() == 1.0 and steps[-1]["loss"] < steps[0]["loss"]
        assert steps[0]["grad_norm"] > 0
    finally:
        reward.shutdown()


def test_a_rank_that_stops_answering_is_declared_hung_and_its_stacks_dumped(policy3: TrainerGroup, tmp_path: Path) -> None:
    """Last of the module's policy3 tests: rank 1 is kept busy (a test hook sleeps inside it) while the group
    is asked for its checksums; past the watch timeout the call raises TrainerFailed naming rank 1, and the hang
    hook dumps that rank's stacks with py-spy from outside the process."""
    from rayrlhf.errors import TrainerFailed
    from rayrlhf.orchestrator.faults import FaultCounters, dump_hang

    counters, dumps = FaultCounters(), []

    def on_hang(role: str, ranks: list[int]) -> None:
        dumps.extend(dump_hang(f"{role}-{r}", tuple(policy3.idents[r]), tmp_path, counters) for r in ranks)

    policy3.watch(timeout_s=3.0, heartbeat_s=1.0, on_hang=on_hang)
    try:
        stall = policy3.actors[1].__ray_call__.remote(lambda rank: __import__("time").sleep(15))
        with pytest.raises(TrainerFailed, match=r"rank\(s\) \[1\] gave no answer to checksums within 3s"):
            policy3.checksums()
        [path] = dumps
        assert counters.hang_dumps == 1 and "<lambda>" in path.read_text()  # the frame rank 1 is stuck in
        # The group is broken from now on: the next calls (queued scoring micro-batches, say) fail at once,
        # without waiting out the timeout again or dumping again (before: one full timeout and dump each).
        start = time.monotonic()
        for _ in range(3):
            with pytest.raises(TrainerFailed, match="being rebuilt"):
                policy3.checksums()
        assert time.monotonic() - start < 1.0 and counters.hang_dumps == 1 and len(dumps) == 1
        ray.get(stall)
    finally:
        policy3.watch(None, 60.0)
        policy3.broken = None


def test_a_one_rank_cpu_trainer_skips_deepspeeds_shared_memory_op() -> None:
    """DeepSpeed loads (on a fresh machine: compiles, about a minute) a shared-memory all-reduce op for every CPU
    process group. The patch that skips it for one rank used to land on torch itself (`import deepspeed.comm.torch as
    m` binds the `torch` that deepspeed.comm re-exports), so every one-rank trainer still loaded it."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from rayrlhf.actors.trainer import skip_shared_memory_op\n"
            "skip_shared_memory_op()\n"
            "print('op:', sys.modules['deepspeed.comm.torch'].build_shm_op())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "op: None", out.stdout

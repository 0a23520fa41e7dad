"""Multi-turn episodes for real (Ray, vLLM, DeepSpeed; environments in their own processes).

1. Token-in, token-out on the architecture matrix's tied Qwen2 in vLLM: what the trainer trains on is, token
   for token, what the engine sampled (recorded inside the engine), the environment's tokens are exactly the
   chat template's rendering of its replies and are never trained, and the trainer's log-probs of the sampled
   tokens agree with the engine's as closely as on single-turn samples.
2. A one-turn environment trains exactly like a single-turn job with the same reward.
3. Everywhere: PPO with a critic across turns (environments in an env actor), asynchronous GRPO with an
   environment that raises, hangs or kills its process on some rows (those episodes fail, the job goes on), and
   a resumed episode job that equals the uninterrupted one.
4. The shipped `box` task learns: after SFT on demonstrations, GRPO raises the reward and the share of episodes
   that open the box and answer with its content.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import ray
import torch
from jobs import mean, train

from rayrlhf.orchestrator.samples import read_samples

ENVS = Path(__file__).parent / "envs" / "chatty.py"
GRPO = "cluster_configs/local-cpu/grpo.yaml"


def _record_turns(worker: object) -> None:
    """Runs inside a rollout worker: keep every completion its engine returns (each turn, as sampled)."""
    engine = worker._engine  # type: ignore[attr-defined]
    original = engine.step
    engine.recorded = []

    def step():  # noqa: ANN202
        done = original()
        engine.recorded.extend((c.request_id, list(c.response_ids), list(c.logprobs)) for c in done)
        return done

    engine.step = step


def _recorded(worker: object) -> list:
    return worker._engine.recorded  # type: ignore[attr-defined]


def _runs(mask: list[int], value: int) -> list[tuple[int, int]]:
    """[start, end) of each run of `value` in `mask`."""
    out, start = [], None
    for i, m in enumerate([*mask, 1 - value]):
        if m == value and start is None:
            start = i
        elif m != value and start is not None:
            out.append((start, i))
            start = None
    return out


@pytest.mark.slow
def test_the_trainer_trains_on_exactly_the_tokens_the_engine_sampled(ray_local: None, tmp_path: Path) -> None:
    from rayrlhf.actors.rollout import create_rollout_workers
    from rayrlhf.actors.trainer import TrainerSettings
    from rayrlhf.actors.trainer_group import TrainerGroup
    from rayrlhf.actors.types import EpisodeSpec, GenerationRequest, SamplingSpec
    from rayrlhf.config import EnvConfig, ModelConfig, RolloutConfig
    from rayrlhf.data.chat import chat_format
    from rayrlhf.models.forward import pack_batch
    from rayrlhf.models.loading import load_tokenizer
    from rayrlhf.models.tiny import resolve_model_path
    from rayrlhf.orchestrator.workers import collect

    model = resolve_model_path("tiny:qwen2", tmp_path)
    env = EnvConfig.model_validate({"class": f"{ENVS}:Chatty", "max_turns": 3, "processes_per_worker": 1})
    [worker] = create_rollout_workers(
        model, RolloutConfig(backend="vllm", num_cpus=0.5, max_new_tokens=12, dtype="float32"), ModelConfig(dtype="float32"),
        seed=0, name_prefix="episode-rollout", max_model_len=256, max_restarts=0,
        episodes={"env": env, "model_path": model, "apply_chat_template": True})
    group = TrainerGroup("policy", model, TrainerSettings(zero_stage=0, micro_batch_size=4, dtype="float32"),
                         name_prefix="episode-policy")
    try:
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        ray.get(worker.__ray_call__.remote(_record_turns))
        tok = load_tokenizer(model)
        fmt = chat_format(tok)
        rows = [{"prompt": "sort: dcba", "system": True}, {"prompt": "sort: hgfe"}]
        requests = [GenerationRequest(f"e{i}", [], SamplingSpec(n=2, temperature=1.0, max_new_tokens=12, seed=11 + i,
                                                                stop_token_ids=(tok.eos_token_id,)),
                                      episode=EpisodeSpec(row=row, messages=[{"role": "user", "content": row["prompt"]}],
                                                          max_turns=3, max_total_tokens=256))
                    for i, row in enumerate(rows)]
        episodes = sorted(collect(worker, requests, timeout_s=300), key=lambda c: (c.request_id, c.sample_index))
        turns = {rid: (ids, lps) for rid, ids, lps in ray.get(worker.__ray_call__.remote(_recorded))}
        assert len(episodes) == 4 and all(c.end_reason == "done" and c.env_error is None for c in episodes)
        for c in episodes:
            policy, env_runs = _runs(c.loss_mask, 1), _runs(c.loss_mask, 0)
            sampled = [turns[f"{c.request_id}#{c.sample_index}@{t}"] for t in range(3)]
            assert [c.response_ids[a:b] for a, b in policy] == [ids for ids, _ in sampled]  # token for token
            assert [c.logprobs[a:b] for a, b in policy] == [lps for _, lps in sampled]
            assert all(c.logprobs[i] == 0.0 for a, b in env_runs for i in range(a, b))
            # the environment's tokens are exactly the template's rendering of its replies (re-derived here)
            history = [{"role": "user", "content": rows[int(c.request_id[1:])]["prompt"]}]
            if rows[int(c.request_id[1:])].get("system"):
                history.insert(0, {"role": "system", "content": "be brief"})
            replies = [[{"role": "tool", "name": "probe", "content": f"seen {len(c.turns[0]['text'])} chars"}],
                       [{"role": "user", "content": "again, shorter"}]]
            for t, (a, b) in enumerate(env_runs):
                ids = sampled[t][0]
                assert c.response_ids[a:b] == fmt.turn_suffix_ids(history, ids, replies[t]), (c.request_id, t)
                history += [{"role": "assistant", "content": c.turns[2 * t]["text"]}, *replies[t]]
            assert [t["trained"] for t in c.turns] == [True, False, True, False, True]
        # what the trainer trains on: the packed batch, loss mask on exactly the sampled tokens
        batch = pack_batch([c.prompt_ids for c in episodes], [c.response_ids for c in episodes], tok.pad_token_id,
                           masks=[c.loss_mask for c in episodes])
        width = batch["mask"].shape[1]
        trained = [batch["input_ids"][i, -width:][batch["mask"][i] == 1].tolist() for i in range(len(episodes))]
        assert trained == [[t for a, b in _runs(c.loss_mask, 1) for t in c.response_ids[a:b]] for c in episodes]
        logp = group.forward_logprobs(batch, temperature=1.0)["logp"]
        engine = torch.zeros_like(logp)
        for i, c in enumerate(episodes):
            engine[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
        gap = ((logp - engine).abs() * batch["mask"]).max().item()
        assert gap < 1e-3, gap  # the same bound as single-turn sampling (tests/test_weight_sync.py)
    finally:
        group.shutdown()
        ray.kill(worker)


ONE_TURN = ("schedule.steps=3", "schedule.prompts_per_step=8", "data.eval=null", "checkpoint.every=0",
            "rollout.max_new_tokens=8", "algorithm.group_size=4")


@pytest.mark.slow
def test_a_one_turn_environment_trains_exactly_like_a_single_turn_job(ray_local: None, tmp_path: Path) -> None:
    single = train(GRPO, tmp_path, "single", *ONE_TURN, "model.policy=tiny:qwen2", "rollout.backend=vllm")
    episodes = train(GRPO, tmp_path, "episodes", *ONE_TURN, "model.policy=tiny:qwen2", "rollout.backend=vllm",
                     f"env.class={ENVS}:OneTurn", "reward.function=null")
    for a, b in zip(single, episodes, strict=True):
        for key in ("reward/mean", "kl/mean", "response/length_mean", "policy/loss", "policy/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert all(r["env/turns_mean"] == 1.0 and r["env/end_reason/done"] == 32 for r in episodes)


@pytest.mark.slow
def test_episodes_everywhere_ppo_async_failures_and_resume(ray_local: None, tmp_path: Path) -> None:
    # PPO: a critic and GAE across turns, environments in an env actor (env.num_workers)
    ppo = train("cluster_configs/local-cpu/ppo.yaml", tmp_path, "ppo", f"env.class={ENVS}:Chatty", "env.num_workers=1",
                "env.max_turns=3", "reward.function=null", "model.reward=null", "schedule.steps=3",
                "schedule.prompts_per_step=4", "trainer.mini_batch_size=4", "data.eval=null", "rollout.max_new_tokens=8",
                "rollout.dump_every=1")
    assert all(r["env/turns_mean"] == 3.0 and r["env/failed"] == 0 for r in ppo)
    assert all(r["response/env_tokens_mean"] > 0 and "critic/explained_variance" in r for r in ppo)
    [sample, *_] = read_samples(tmp_path / "ppo" / "samples" / "step_3.jsonl")
    assert [t["role"] for t in sample["turns"]] == ["assistant", "tool", "assistant", "user", "assistant"]

    # Asynchronous GRPO with an environment that raises, hangs or dies on some rows: only those episodes fail
    fragile = train(GRPO, tmp_path, "fragile", f"env.class={ENVS}:Fragile", "env.step_timeout_s=3", "env.max_turns=2",
                    "reward.function=null", "schedule.max_staleness=1", "schedule.prompts_per_step=8", "data.eval=null",
                    "rollout.max_new_tokens=8", "checkpoint.every=0", "faults.max_failed_frac=0.9", "schedule.steps=3")
    failed = sum(r["env/failed"] for r in fragile)
    assert 0 < failed < 3 * 32 and all(r["reward/failed"] == 0 and r["rollout/samples"] == 32 for r in fragile)

    # ... and an episode job stopped after step 2 and resumed equals the uninterrupted one (on-policy: a run capped at
    # 2 steps in asynchronous mode never launches step 3's batch, so it is not the uninterrupted run's first part)
    job = (f"env.class={ENVS}:Chatty", "env.max_turns=3", "reward.function=null", "schedule.prompts_per_step=8",
           "data.eval=null", "rollout.max_new_tokens=8", "checkpoint.every=2")
    straight = train(GRPO, tmp_path, "async", *job, "schedule.steps=4")
    train(GRPO, tmp_path, "resumed", *job, "schedule.steps=2")
    resumed = train(GRPO, tmp_path, "resumed", *job, "schedule.steps=4", resume=True)
    for a, b in zip(straight, resumed, strict=True):
        for key in ("reward/mean", "env/turns_mean", "response/env_tokens_mean", "policy/loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)


@pytest.mark.slow
def test_the_box_task_learns_to_use_its_tool(ray_local: None, tmp_path: Path) -> None:
    """SFT on demonstrations, then GRPO: the reward and the share of episodes whose tool call succeeds both rise."""
    train("cluster_configs/local-cpu/tool_sft.yaml", tmp_path, "sft")
    rows = train("cluster_configs/local-cpu/tool_grpo.yaml", tmp_path, "grpo", f"model.policy={tmp_path / 'sft' / 'final'}",
                 "schedule.steps=40", "schedule.eval_every=0", "checkpoint.every=0")
    steps = [r for r in rows if r["step"] > 0]
    assert mean(steps[-10:], "reward/mean") > mean(steps[:10], "reward/mean") + 0.03
    # the share of episodes whose tool call succeeded (a well-formed open_box call) rises too
    assert mean(steps[-10:], "env/tool_calls_mean") > mean(steps[:10], "env/tool_calls_mean") + 0.05
    assert all(r["env/failed"] == 0 for r in steps)

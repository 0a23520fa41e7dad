"""Multi-turn throughput: episodes per second through the rollout worker (continuous batching across episodes:
a turn is added to the engine as soon as its environment answers) against a lockstep baseline that runs each
turn as one batch on the same worker and waits for every environment before the next turn, in the same run.

The environment sleeps a seeded latency in [0, --max-latency-ms] per step, the same for both sides (seeded by
the episode and the turn), and every episode has --turns turns. The goal in issue 17 is a ratio >= 1.5.

    python bench/multiturn_throughput.py [--episodes 64] [--turns 4] [--max-latency-ms 200] [--backend vllm]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import machine, result

ENV = '''
import asyncio
import random


def latency(episode: str, turn: int, max_ms: float) -> float:
    return random.Random(f"{episode}/{turn}").uniform(0.0, max_ms) / 1000.0


class Sleepy:
    """Every step waits a seeded latency, then says "go on"; done after `turns` turns."""

    def __init__(self, turns=4, max_ms=200.0):
        self.turns, self.max_ms = turns, max_ms

    async def reset(self, row):
        self.episode, self.turn = row["episode"], 0

    async def step(self, action):
        await asyncio.sleep(latency(self.episode, self.turn, self.max_ms))
        self.turn += 1
        return "go on", 0.0, self.turn >= self.turns
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-latency-ms", type=float, default=200.0)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--backend", default="vllm", choices=("vllm", "hf"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    from rayrlhf.actors.rollout import create_rollout_workers
    from rayrlhf.actors.types import EpisodeSpec, GenerationRequest, SamplingSpec
    from rayrlhf.config import EnvConfig, ModelConfig, RolloutConfig
    from rayrlhf.data.chat import EpisodeTokens, chat_format
    from rayrlhf.models.loading import load_tokenizer
    from rayrlhf.models.tiny import resolve_model_path
    from rayrlhf.orchestrator.workers import collect

    work = Path(tempfile.mkdtemp(prefix="rayrlhf-multiturn-"))
    (work / "sleepy.py").write_text(ENV)
    model = resolve_model_path("tiny:qwen2", work)
    tok = load_tokenizer(model)
    fmt = chat_format(tok)
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    env = EnvConfig.model_validate({"class": f"{work / 'sleepy.py'}:Sleepy", "max_turns": args.turns,
                                    "kwargs": {"turns": args.turns, "max_ms": args.max_latency_ms}})
    rollout = RolloutConfig(backend=args.backend, num_cpus=1, max_new_tokens=args.max_new_tokens, dtype="float32")
    max_len = 64 + args.turns * (args.max_new_tokens + 16)
    [worker] = create_rollout_workers(model, rollout, ModelConfig(dtype="float32"), seed=0, max_model_len=max_len,
                                      episodes={"env": env, "model_path": model, "apply_chat_template": True})
    spec = SamplingSpec(n=1, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=7, stop_token_ids=(tok.eos_token_id,))
    rows = [{"prompt": f"sort: {'abcdefgh'[i % 8]}{'hgfedcba'[i % 7]}", "episode": f"e{i}"} for i in range(args.episodes)]

    def ours(tag: str) -> float:
        requests = [GenerationRequest(f"{tag}{i}", [], spec, episode=EpisodeSpec(
            row=row, messages=[{"role": "user", "content": row["prompt"]}], max_turns=args.turns, max_total_tokens=max_len))
            for i, row in enumerate(rows)]
        start = time.perf_counter()
        done = collect(worker, requests, timeout_s=600)
        assert len(done) == args.episodes and all(c.end_reason == "done" for c in done), {c.end_reason for c in done}
        return time.perf_counter() - start

    namespace: dict = {}
    exec(ENV, namespace)  # the same latencies, on the driver: the lockstep baseline steps environments itself

    def lockstep(tag: str) -> float:
        episodes = [EpisodeTokens.start(fmt, [{"role": "user", "content": row["prompt"]}]) for row in rows]
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.episodes) as pool:
            for turn in range(args.turns):
                requests = [GenerationRequest(f"{tag}{i}@{turn}", list(ep.ids), spec) for i, ep in enumerate(episodes)]
                done = {c.request_id: c for c in collect(worker, requests, timeout_s=600)}  # the whole batch, then ...
                waits = [pool.submit(time.sleep, namespace["latency"](row["episode"], turn, args.max_latency_ms))
                         for row in rows]
                for w in waits:  # ... every environment, before the next turn
                    w.result()
                for i, ep in enumerate(episodes):
                    sampled = done[f"{tag}{i}@{turn}"].response_ids
                    ep.add_turn(sampled, [{"role": "user", "content": "go on"}], next_turn=turn + 1 < args.turns)
        return time.perf_counter() - start

    ours("warm")  # engine warm-up and the environment processes' start
    ours_s = min(ours(f"ours{k}-") for k in range(2))
    base_s = min(lockstep(f"lock{k}-") for k in range(2))
    print(f"{args.episodes} episodes x {args.turns} turns, environment latency 0-{args.max_latency_ms:.0f} ms, "
          f"{args.backend}: continuous {ours_s:.2f} s, lockstep {base_s:.2f} s ({machine()})")
    result("multiturn_episodes_per_s", args.episodes / ours_s, args.episodes / base_s, backend=args.backend,
           turns=args.turns, max_latency_ms=args.max_latency_ms)
    ray.shutdown()


if __name__ == "__main__":
    main()

"""Rollout throughput: tokens/s through the RolloutWorker actor (streaming) versus raw
`vllm.LLM.generate` on the same prompts, model and sampling settings, in the same run.

    python bench/rollout_throughput.py [--prompts 256] [--max-new-tokens 64] [--rounds 3] [--threads N]

Both engines stay up for the whole run and take turns, round after round (raw, then the actor), so
a slow minute of a shared machine hits both; the figures are the medians over the rounds.
`--threads` sets the actor's rollout.num_threads (default: the project's choice for the model); the
raw engine runs in this process with whatever OMP_NUM_THREADS it was started with.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import build_model, machine, num_params, result

# two engines at once: each gets a fixed 1 GiB KV cache instead of a share of the node's memory
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def prompts_for(tokenizer, n: int) -> list[list[int]]:
    letters = "abcdefgh"
    return [tokenizer(f"sort: {letters[i % 8]}{letters[(3 * i) % 8]}{letters[(5 * i + 1) % 8]}", add_special_tokens=False)["input_ids"] for i in range(n)]


def raw_vllm(model: Path, prompt_ids: list[list[int]], max_new: int, max_len: int):
    """A function generating every prompt with raw `LLM.generate` in this process; returns (seconds, tokens)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(model), dtype="float32", gpu_memory_utilization=0.2, max_model_len=max_len, seed=0, enforce_eager=True)
    params = SamplingParams(temperature=1.0, max_tokens=max_new, logprobs=0, seed=1)
    llm.generate([TokensPrompt(prompt_token_ids=prompt_ids[0])], params, use_tqdm=False)  # warm-up

    def run() -> tuple[float, int]:
        start = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
        return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)

    return run


def through_actor(model: Path, prompt_ids: list[list[int]], max_new: int, max_len: int, threads: int | None = None):
    """A function generating every prompt through one RolloutWorker actor (Ray must be up); returns (seconds, tokens)."""
    from rayrlhf.actors.rollout import create_rollout_workers
    from rayrlhf.actors.types import GenerationRequest, SamplingSpec
    from rayrlhf.config import ModelConfig, RolloutConfig
    from rayrlhf.orchestrator.workers import collect

    cfg = RolloutConfig(backend="vllm", num_workers=1, dtype="float32", max_new_tokens=max_new, num_cpus=1,
                        num_threads=threads)
    [worker] = create_rollout_workers(model, cfg, ModelConfig(dtype="float32"), seed=0, max_model_len=max_len)
    spec = SamplingSpec(temperature=1.0, max_new_tokens=max_new, seed=1)
    collect(worker, [GenerationRequest("warm", prompt_ids[0], spec)])
    rounds = itertools.count()

    def run() -> tuple[float, int]:
        k = next(rounds)
        requests = [GenerationRequest(f"k{k}-r{i}", p, spec) for i, p in enumerate(prompt_ids)]
        start = time.perf_counter()
        tokens = sum(len(c.response_ids) for c in collect(worker, requests))
        return time.perf_counter() - start, tokens

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="turns each engine takes (the figures are medians)")
    parser.add_argument("--threads", type=int, default=None, help="the actor's rollout.num_threads (default: automatic)")
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "rayrlhf-bench-30m")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model = build_model(args.model_dir, hidden=512, layers=8, intermediate=1536, heads=8)
    import ray
    import torch
    from transformers import AutoTokenizer

    from rayrlhf.actors.resources import default_threads

    prompt_ids = prompts_for(AutoTokenizer.from_pretrained(str(model)), args.prompts)
    max_len = 32 + args.max_new_tokens
    raw = raw_vllm(model, prompt_ids, args.max_new_tokens, max_len)
    raw_threads = torch.get_num_threads()  # what the raw engine computes with (vLLM sets it at start-up)
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"]}})
    try:
        actor = through_actor(model, prompt_ids, args.max_new_tokens, max_len, args.threads)
        figures: dict[str, list[float]] = {"raw": [], "actor": []}
        for k in range(args.rounds):
            for name, run in (("raw", raw), ("actor", actor)):
                seconds, tokens = run()
                figures[name].append(tokens / seconds)
                print(f"round {k + 1}: {name} {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.0f} tok/s", flush=True)
    finally:
        ray.shutdown()
    raw_tps, actor_tps = statistics.median(figures["raw"]), statistics.median(figures["actor"])
    print(f"model: {num_params(model) / 1e6:.1f}M parameters; {args.prompts} prompts x {args.max_new_tokens} new tokens; {machine()}")
    print(f"threads: actor {args.threads or default_threads(model, 1)}, raw engine {raw_threads}")
    print(f"raw vllm.LLM.generate: {raw_tps:.0f} tok/s (median of {args.rounds}: {', '.join(f'{x:.0f}' for x in figures['raw'])})")
    print(f"RolloutWorker actor:   {actor_tps:.0f} tok/s (median of {args.rounds}: {', '.join(f'{x:.0f}' for x in figures['actor'])})")
    result("rollout_tokens_per_s", actor_tps, raw_tps, unit="tok/s", baseline_name="raw vllm.LLM.generate",
           rounds=args.rounds)


if __name__ == "__main__":
    main()

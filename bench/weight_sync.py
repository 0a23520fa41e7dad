"""Weight sync bandwidth: GB/s of a full, verified-equal sync of a ~100M-parameter policy from a
DeepSpeed trainer into the rollout workers, versus one in-process memory copy of the same bytes
(the ceiling for any CPU transfer), measured in the same run.

    python bench/weight_sync.py [--workers 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
from common import build_model, machine, num_params, result


def memcpy_gbps(nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "rayrlhf-bench-100m")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model = build_model(args.model_dir, hidden=768, layers=12, intermediate=3072, heads=12)
    params = num_params(model)
    nbytes = params * 4

    import ray

    from rayrlhf.actors.rollout import create_rollout_workers
    from rayrlhf.actors.trainer import TrainerSettings
    from rayrlhf.actors.trainer_group import TrainerGroup
    from rayrlhf.actors.weight_sync import broadcast_weights, verify_weights
    from rayrlhf.config import ModelConfig, RolloutConfig

    ray.init(address="local", num_cpus=8, include_dashboard=False)
    try:
        group = TrainerGroup("policy", str(model), TrainerSettings(zero_stage=args.zero_stage, dtype="float32"), num_ranks=1)
        workers = create_rollout_workers(
            model, RolloutConfig(backend="vllm", num_workers=args.workers, dtype="float32", num_cpus=1, max_new_tokens=8),
            ModelConfig(dtype="float32"), seed=0, max_model_len=64,
        )
        broadcast_weights(group, workers, 1, args.bucket_mb << 20, "float32")  # warm-up
        times = []
        for version in range(2, 2 + args.repeats):
            start = time.perf_counter()
            broadcast_weights(group, workers, version, args.bucket_mb << 20, "float32")
            times.append(time.perf_counter() - start)
        verify_weights(group, workers, "float32")
        stream = []  # the transport alone: gather, bucket and store, without the engines' reload
        for _ in range(args.repeats):
            start = time.perf_counter()
            refs = list(group.iter_weight_buckets(args.bucket_mb << 20, "float32"))
            group.finish_weight_stream()
            ray.get(refs)
            stream.append(time.perf_counter() - start)
        group.shutdown()
    finally:
        ray.shutdown()
    sync_gbps = nbytes / min(times) / 1e9
    copy_gbps = memcpy_gbps(nbytes, args.repeats)
    print(f"model: {params / 1e6:.1f}M parameters = {nbytes / 1e9:.2f} GB fp32; {args.workers} vLLM worker(s); {machine()}")
    print(f"sync times (s): {[round(t, 3) for t in times]} -> {sync_gbps:.2f} GB/s (best); checksums verified equal")
    print(f"transport alone (gather + object store, no engine reload): {nbytes / min(stream) / 1e9:.2f} GB/s")
    print(f"single in-process memcpy: {copy_gbps:.2f} GB/s")
    result("weight_sync_gb_per_s", sync_gbps, copy_gbps, unit="GB/s", baseline_name="in-process memcpy", workers=args.workers)


if __name__ == "__main__":
    main()

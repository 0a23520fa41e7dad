"""docs/memory.md's sizing table: GRPO on Qwen2.5-7B/32B/72B shapes over 8, 64 and 512 GPUs of 80 GB, by the planner.

    python tests/capacity_table.py        # prints the markdown table

Workload per 8 GPUs: 32 prompts x 8 samples per step, prompts up to 1024 tokens, responses up to 2048,
two optimizer steps per step, micro-batches of 4 rows, bf16, gradient checkpointing; nodes of 8 GPUs
with 1000 GiB of host memory. For each cell the layouts are tried cheapest first (ZeRO-2, then ZeRO-3,
then ZeRO-3 with the optimizer state and then the parameters offloaded; smaller tensor parallelism; half
the GPUs training; the reference at 8 rows per forward, then 2) and the first the planner accepts is
shown; when the reference cannot fit one GPU, the KL term is dropped (no reference server).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rayrlhf.config import load_config
from rayrlhf.orchestrator.capacity import GiB
from rayrlhf.orchestrator.capacity_plan import CapacityReport, Cluster, check_capacity

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"Qwen2.5-7B": "Qwen/Qwen2.5-7B-Instruct", "Qwen2.5-32B": "Qwen/Qwen2.5-32B-Instruct",
          "Qwen2.5-72B": "Qwen/Qwen2.5-72B-Instruct"}


def layouts(gpus: int) -> list[dict[str, Any]]:
    out = []
    for kl in (0.001, 0.0):
        for stage, offload in ((2, "none"), (3, "none"), (3, "optimizer"), (3, "all")):
            for tp in (1, 2, 4, 8):
                for share in (2, 4):
                    for ref_rows in (8, 2):
                        ranks = gpus // share
                        ref = 1 if kl else 0
                        workers = (gpus - ranks - ref) // tp
                        if workers >= 1 and (kl or ref_rows == 8):
                            out.append({"algorithm.kl_coef": kl, "trainer.zero_stage": stage, "trainer.offload": offload,
                                        "trainer.policy.num_ranks": ranks, "rollout.tensor_parallel_size": tp,
                                        "rollout.num_gpus": tp, "rollout.num_workers": workers,
                                        "servers.reference_num_gpus": ref, "servers.micro_batch_size": ref_rows})
    return out


def size(model: str, gpus: int) -> tuple[dict[str, Any], CapacityReport] | None:
    shapes: dict = {}
    cluster = Cluster.parse(f"nodes={max(1, gpus // 8)},gpus_per_node={min(gpus, 8)},gpu_mem_gib=80,host_mem_gib=1000")
    base = [f"model.policy={model}", f"schedule.prompts_per_step={4 * gpus}", f"trainer.mini_batch_size={16 * gpus}",
            "output_dir=/tmp/plan", "trainer.micro_batch_size=4"]
    for layout in layouts(gpus):
        cfg = load_config(ROOT / "cluster_configs" / "gpu-1x8" / "grpo.yaml",
                          base + [f"{k}={v}" for k, v in layout.items()])
        report = check_capacity(cfg, cluster, shapes)
        if report.fits:
            return layout, report
    return None


def row(name: str, gpus: int) -> str:
    found = size(MODELS[name], gpus)
    if found is None:
        return f"| {name} | {gpus} | no | - | - | - | - |"
    layout, report = found
    tight = min(report.actors, key=lambda a: a.headroom if a.headroom is not None else float("inf"))
    policy = next(a for a in report.actors if a.spec.role == "policy")
    rollout = next(a for a in report.actors if a.spec.role == "rollout")
    ref = (f"1 GPU, {layout['servers.micro_batch_size']} rows per forward" if layout["servers.reference_num_gpus"]
           else "none (kl_coef 0)")
    offload = f", offload {layout['trainer.offload']}" if layout["trainer.offload"] != "none" else ""
    return (f"| {name} | {gpus} | yes | {layout['trainer.policy.num_ranks']} ranks, ZeRO-{layout['trainer.zero_stage']}{offload}, "
            f"{policy.estimate.gib():.0f} GiB | {layout['rollout.num_workers']} x TP {layout['rollout.tensor_parallel_size']}, "
            f"{rollout.estimate.gib():.0f} GiB of {rollout.budget / GiB:.0f} | {ref} | "
            f"{tight.spec.name} {tight.headroom / GiB:+.0f} GiB |")


def main() -> None:
    print("| model | GPUs | fits | policy (per GPU) | rollout engines (per GPU, of the vLLM share) | reference | "
          "tightest actor (headroom) |")
    print("|---|---|---|---|---|---|---|")
    for name in MODELS:
        for gpus in (8, 64, 512):
            print(row(name, gpus), flush=True)


if __name__ == "__main__":
    main()

"""LoRA against full fine-tuning of the same model, in one run: trainer memory, bytes synced per step, step time.

Two GRPO jobs of the local `sort` task (`cluster_configs/local-cpu/grpo.yaml`), back to back on the same
Ray instance and the same ~75M-parameter Qwen2 (`bench/peer_trl_grpo.py`'s `--size 75m`: width 768,
12 layers), vLLM engines, 8 prompts x 4 samples x 16 new tokens per step, float32:
- full: the whole model trains (AdamW state for every weight) and every sync sends the whole model;
- lora: `model.lora` rank 16 (all-linear by default): only the adapter trains, every sync sends the
  adapter into vLLM's LoRA slots (both verify their first sync, then every 10th).
Measured per job: the policy rank's resident memory (sampled every 20 ms from its process; the peak
while steps run, and the whole-life peak including loading), the bytes each sync sends (the tensors
of the sync's layout), and the median step, train, rollout and sync times over steps 2.. (step 1 warms
up). The closing JSON line is syncs per GB (higher is better): its ratio is how many times less a LoRA
sync moves than a full one.

    python bench/lora.py [--rank 16] [--steps 6] [--targets all-linear]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from common import machine, result

ROOT = Path(__file__).resolve().parents[1]
SHAPE_75M = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 2,
             "intermediate_size": 2048}  # the ~75M Qwen2 of bench/peer_trl_grpo.py


class RssSampler:
    """Samples the resident memory of the job's policy rank (found by its actor name) until stopped."""

    def __init__(self, metrics: Path, actor: str = "policy-0", every_s: float = 0.02) -> None:
        self.metrics, self.actor, self.every_s = metrics, actor, every_s
        self.peak = self.peak_steps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _pid(self) -> int | None:
        import ray

        try:
            return int(ray.get(ray.get_actor(self.actor).identity.remote(), timeout=5)[1])
        except Exception:  # noqa: BLE001 - not started yet
            return None

    def _run(self) -> None:
        import psutil

        pid = None
        while not self._stop.is_set() and pid is None:
            pid = self._pid()
            time.sleep(0.2)
        if pid is None:
            return
        proc = psutil.Process(pid)
        while not self._stop.is_set():
            try:
                rss = proc.memory_info().rss
                hwm = _vm_hwm(pid)
            except psutil.Error:
                return
            self.peak = max(self.peak, rss, hwm)
            if self.metrics.is_file() and self.metrics.stat().st_size > 0:  # the first step is done: steps run
                self.peak_steps = max(self.peak_steps, rss)
            time.sleep(self.every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def tensor_bytes(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sum(f.get_tensor(k).numel() * 4 for k in f.keys())  # float32 on the wire


def run(tmp: Path, name: str, model: Path, steps: int, extra: list[str]) -> dict:
    from rayrlhf.config import load_config
    from rayrlhf.launch.run import run_job
    from rayrlhf.orchestrator.metrics import read_metrics

    out = tmp / name
    cfg = load_config(ROOT / "cluster_configs/local-cpu/grpo.yaml", [
        f"output_dir={out}", f"model.policy={model}", f"schedule.steps={steps}", "checkpoint.every=0", "data.eval=null",
        "schedule.prompts_per_step=8", "algorithm.group_size=4", "rollout.max_new_tokens=16", "rollout.backend=vllm",
        "rollout.dtype=float32", "model.dtype=float32", "trainer.policy.lr=1e-4",
        "data.max_prompt_tokens=48", "algorithm.kl_coef=0.01", *extra,
    ])
    sampler = RssSampler(out / "metrics.jsonl")
    try:
        run_job(cfg)
    finally:
        sampler.stop()
    rows = read_metrics(out / "metrics.jsonl")[1:]

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    return {"peak_rss": sampler.peak, "peak_rss_steps": sampler.peak_steps, "step_s": median("timing/step_s"),
            "train_s": median("timing/train_s"), "rollout_s": median("timing/rollout_s"), "sync_s": median("timing/sync_s"),
            "out": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--targets", default="all-linear", help="model.lora.target_modules (e.g. '[q_proj, k_proj, v_proj, o_proj]')")
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "rayrlhf-bench-qwen2-75m")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.chdir(ROOT)  # the shipped config names its data relative to the repository root
    from rayrlhf.models.architectures import build_architecture

    if not (args.model_dir / "config.json").is_file():
        build_architecture("qwen2", args.model_dir, **SHAPE_75M)
    full_bytes = tensor_bytes(args.model_dir / "model.safetensors")

    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="rayrlhf-bench-lora-"))
    try:
        full = run(tmp, "full", args.model_dir, args.steps, [])
        lora = run(tmp, "lora", args.model_dir, args.steps,
                   [f"model.lora.rank={args.rank}", f"model.lora.alpha={2 * args.rank}", "model.lora.sync=adapter",
                    f"model.lora.target_modules={args.targets}"])
    finally:
        ray.shutdown()
    lora_bytes = tensor_bytes(lora["out"] / "final" / "adapter_model.safetensors")  # what each adapter sync sends
    gib = 1024**3
    print(f"model: {full_bytes / 4 / 1e6:.1f}M parameters (Qwen2, width 768, 12 layers), float32; {machine()}")
    print(f"LoRA rank {args.rank} on {args.targets}: {lora_bytes / 4 / 1e6:.2f}M adapter parameters")
    for name, r, sync in (("full", full, full_bytes), ("lora", lora, lora_bytes)):
        print(f"{name:>5}: trainer peak RSS {r['peak_rss_steps'] / gib:.2f} GiB while stepping ({r['peak_rss'] / gib:.2f} GiB "
              f"incl. loading); sync {sync / 1e6:.1f} MB/step in {r['sync_s']:.3f} s; step {r['step_s']:.2f} s "
              f"(rollout {r['rollout_s']:.2f}, train {r['train_s']:.2f})")
    result("weight_syncs_per_gb", 1e9 / lora_bytes, 1e9 / full_bytes, unit="syncs/GB", baseline_name="full fine-tuning",
           rank=args.rank, targets=args.targets, sync_shrink=round(full_bytes / lora_bytes, 2),
           trainer_peak_rss_gib={"lora": round(lora["peak_rss_steps"] / gib, 3), "full": round(full["peak_rss_steps"] / gib, 3)},
           step_s={"lora": round(lora["step_s"], 3), "full": round(full["step_s"], 3)},
           sync_s={"lora": round(lora["sync_s"], 4), "full": round(full["sync_s"], 4)})


if __name__ == "__main__":
    main()

"""Measure one trainer rank's peak memory over a train step, for tests/test_capacity.py (and by hand).

    python tests/capacity_measure.py MODEL_DIR STAGE RANKS ROWS PROMPT RESPONSE CHECKPOINTING [OFFLOAD]

Each rank is its own process running the project's real `TrainerRank` (the class under the Ray actor,
no Ray) with DeepSpeed on CPU in float32. Method: glibc is told to serve every allocation over
64 KiB with its own mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set at once;
the process's resident memory is read after the imports (the baseline); the engine is built and one
small step allocates the optimizer states; the kernel's high-water mark (VmHWM) is then reset
(`echo 5 > /proc/self/clear_refs`) and the measured step runs. Peak = VmHWM - baseline: weights,
gradients, optimizer states, activations, logits and every temporary of that step, as the process
really held them. Prints one JSON line per rank.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _batch(rows: int, prompt: int, response: int, vocab: int, seed: int) -> dict:
    import torch

    from rayrlhf.models.forward import pack_batch

    gen = torch.Generator().manual_seed(seed)
    # one row's prompt is shorter: the batch is padded, as real batches are (transformers then passes a mask)
    prompts = [torch.randint(4, vocab, (prompt - (3 if i == 0 and prompt > 4 else 0),), generator=gen).tolist()
               for i in range(rows)]
    responses = [torch.randint(4, vocab, (response,), generator=gen).tolist() for _ in range(rows)]
    batch = pack_batch(prompts, responses, pad_id=0)
    batch["advantages"] = torch.randn(rows, response, generator=gen)
    batch["ref_logp"] = -torch.rand(rows, response, generator=gen)
    return batch


def rank_main(model: str, stage: int, ranks: int, rank: int, port: int, rows: int, prompt: int, response: int,
              checkpointing: bool, offload: str = "none") -> None:
    import torch

    torch.set_num_threads(1)
    import deepspeed.comm.torch as ds_comm_torch

    from rayrlhf.actors.trainer import TrainerRank, TrainerSettings

    ds_comm_torch.build_shm_op = lambda: None  # plain gloo: no JIT build of DeepSpeed's CPU shm op
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    settings = TrainerSettings(zero_stage=stage, micro_batch_size=rows, lr=1e-5, dtype="float32", bf16=False,
                               gradient_checkpointing=checkpointing, num_threads=1, offload=offload)
    cls = TrainerRank.__ray_metadata__.modified_class  # the plain class under the Ray actor
    baseline = _status("VmRSS")
    trainer = cls("policy", model, rank, ranks, "127.0.0.1", port, settings)
    trainer.setup()
    args = {"clip_eps": 0.2, "kl_coef": 0.01, "kl_estimator": "k3"}
    trainer.train_step(_batch(1, 4, 2, vocab, seed=rank), "ppo", args)  # allocates the optimizer states
    batch = _batch(rows, prompt, response, vocab, seed=100 + rank)
    Path("/proc/self/clear_refs").write_text("5")
    trainer.train_step(batch, "ppo", args)
    peak = _status("VmHWM") - baseline
    print(json.dumps({"rank": rank, "peak_bytes": peak, "baseline_bytes": baseline}), flush=True)
    trainer.shutdown()


def measure(model: str | Path, stage: int, ranks: int, rows: int, prompt: int, response: int,
            checkpointing: bool, offload: str = "none", timeout: float = 300) -> list[int]:
    """Peak bytes of each rank (one process each, started together)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(
        [sys.executable, __file__, "--rank", str(model), str(stage), str(ranks), str(r), str(port), str(rows),
         str(prompt), str(response), str(int(checkpointing)), offload],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in range(ranks)]
    peaks = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"measurement rank failed ({p.returncode}):\n{err[-4000:]}")
        peaks.append(json.loads(out.strip().splitlines()[-1])["peak_bytes"])
    return peaks


if __name__ == "__main__":
    if sys.argv[1] == "--rank":
        m, st, n, r, port, rows, p, t, ck, off = sys.argv[2:12]
        rank_main(m, int(st), int(n), int(r), int(port), int(rows), int(p), int(t), bool(int(ck)), off)
    else:
        m, st, n, rows, p, t, ck, *off = sys.argv[1:9]
        print(measure(m, int(st), int(n), int(rows), int(p), int(t), bool(int(ck)), *off))

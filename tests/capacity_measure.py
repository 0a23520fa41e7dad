"""Measure one trainer rank's peak memory over a train step, for tests/test_capacity.py (and by hand), or over
building its model under ZeRO-3 (`measure_setup`, for tests/test_partitioned_init.py and bench/zero3_init.py).

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


def setup_main(model: str, ranks: int, rank: int, port: int, partitioned: bool) -> None:
    """One ZeRO-3 rank's peaks, in float32: over building its model (`TrainerRank._build_model`, the peak read as
    it returns: "construction") and over all of `TrainerRank.setup` with DeepSpeed's engine ("setup")."""
    import torch

    torch.set_num_threads(1)
    import deepspeed.comm.torch as ds_comm_torch

    from rayrlhf.actors.trainer import TrainerRank, TrainerSettings

    ds_comm_torch.build_shm_op = lambda: None
    settings = TrainerSettings(zero_stage=3, micro_batch_size=1, dtype="float32", bf16=False, num_threads=1,
                               partitioned_init=partitioned)
    cls = TrainerRank.__ray_metadata__.modified_class
    build, peaks = cls._build_model, {}

    def recorded(self, *args):  # noqa: ANN001, ANN202 - the real method, its peak read as it returns
        model = build(self, *args)
        peaks["construction"] = _status("VmHWM") - baseline
        return model

    cls._build_model = recorded
    baseline, anon_baseline = _status("VmRSS"), _status("RssAnon")
    sampler = _AnonSampler()
    trainer = cls("policy", model, rank, ranks, "127.0.0.1", port, settings)
    trainer.setup()
    peaks["setup"] = _status("VmHWM") - baseline
    peaks["setup_anonymous"] = sampler.stop() - anon_baseline
    print(json.dumps({"rank": rank, "peak_bytes": peaks, "baseline_bytes": baseline}), flush=True)
    trainer.shutdown()


class _AnonSampler:
    """The largest private (anonymous) resident memory seen, sampled every millisecond in a thread: VmHWM also
    counts the checkpoint's file pages a rank touches through a memory map, which the page cache shares between
    the ranks of a node and can drop; this counts only what the process itself allocated."""

    def __init__(self) -> None:
        import threading

        self.peak, self._done = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.001):
            self.peak = max(self.peak, _status("RssAnon"))

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return max(self.peak, _status("RssAnon"))


def measure_setup(model: str | Path, ranks: int, partitioned: bool, timeout: float = 600) -> list[dict[str, int]]:
    """{"construction": bytes, "setup": bytes} of each of `ranks` ZeRO-3 ranks (one process each, see setup_main)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(
        [sys.executable, __file__, "--setup", str(model), str(ranks), str(r), str(port), str(int(partitioned))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in range(ranks)]
    return _peaks(procs, timeout)


def _peaks(procs: list[subprocess.Popen], timeout: float) -> list:
    peaks = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"measurement rank failed ({p.returncode}):\n{err[-4000:]}")
        peaks.append(json.loads(out.strip().splitlines()[-1])["peak_bytes"])
    return peaks


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
    return _peaks(procs, timeout)


if __name__ == "__main__":
    if sys.argv[1] == "--setup":
        m, n, r, port, part = sys.argv[2:7]
        setup_main(m, int(n), int(r), int(port), bool(int(part)))
    elif sys.argv[1] == "--rank":
        m, st, n, r, port, rows, p, t, ck, off = sys.argv[2:12]
        rank_main(m, int(st), int(n), int(r), int(port), int(rows), int(p), int(t), bool(int(ck)), off)
    else:
        m, st, n, rows, p, t, ck, *off = sys.argv[1:9]
        print(measure(m, int(st), int(n), int(rows), int(p), int(t), bool(int(ck)), *off))

"""Peak host memory of one training forward + backward through the policy's log-probs, for tests/test_logprob_chunks.py.

    python tests/logprob_measure.py MODEL_DIR DTYPE IMPL ROWS RESPONSE TEMPERATURE   # IMPL: chunked | before

`chunked` is `models.forward.token_logprobs`; `before` is the implementation it replaced (kept below, verbatim
in behaviour): float32 blocks of the logits under plain autograd, which keeps every block for backward. Method as
in tests/capacity_measure.py: glibc serves allocations over 64 KiB with their own mmap so freed tensors leave the
resident set at once; one warm-up pass; the kernel's high-water mark is reset (`/proc/self/clear_refs`) and the
measured pass runs. Peak = VmHWM - the resident memory just before it. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}


def before_token_logprobs(model, batch, temperature=1.0, with_entropy=False):  # noqa: ANN001, ANN201 - the old code
    """The implementation `_ChunkedLogprobs` replaced: autograd keeps every float32 block for backward."""
    import torch

    from rayrlhf.models.forward import response_logits

    logits = response_logits(model, batch)
    t_len = batch["mask"].shape[1]
    targets = batch["input_ids"][:, -t_len:]
    flat = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    logp_parts, entropy_parts = [], []
    for start in range(0, flat.shape[0], 2048):
        chunk = flat[start : start + 2048].float()
        if temperature != 1.0:
            chunk = chunk / temperature
        lse = torch.logsumexp(chunk, dim=-1)
        logp_parts.append(chunk.gather(-1, flat_targets[start : start + 2048, None]).squeeze(-1) - lse)
        if with_entropy:
            with torch.no_grad():
                probs = torch.exp(chunk - lse[:, None])
                entropy_parts.append(lse - (probs * chunk).sum(-1))
    logp = torch.cat(logp_parts).reshape(targets.shape) * batch["mask"]
    entropy = torch.cat(entropy_parts).reshape(targets.shape) * batch["mask"] if with_entropy else None
    return logp, entropy


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def run(model_dir: str, dtype: str, impl: str, rows: int, response: int, temperature: float) -> dict:
    import torch

    from rayrlhf.models.forward import pack_batch, token_logprobs
    from rayrlhf.models.loading import load_policy

    torch.set_num_threads(1)
    fn = token_logprobs if impl == "chunked" else before_token_logprobs
    model = load_policy(model_dir, dtype).train()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    batch = pack_batch([torch.randint(4, vocab, (16,), generator=gen).tolist() for _ in range(rows)],
                       [torch.randint(4, vocab, (response,), generator=gen).tolist() for _ in range(rows)], 0)

    def step() -> None:
        logp, _ = fn(model, batch, temperature, True)
        logp.sum().backward()
        model.zero_grad(set_to_none=False)  # gradients stay allocated: only the pass's own memory is measured

    step()
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    step()
    logits = rows * (response + 1) * vocab * torch.finfo(getattr(torch, dtype)).bits // 8
    return {"impl": impl, "dtype": dtype, "peak_bytes": _status("VmHWM") - base, "logits_bytes": logits}


def measure(model_dir: str | Path, dtype: str, impl: str, rows: int, response: int, temperature: float) -> dict:
    """Run one measurement in a fresh process (its own high-water mark and allocator)."""
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, __file__, str(model_dir), dtype, impl, str(rows), str(response), str(temperature)],
                         capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"measurement failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    m, d, i, r, t, temp = sys.argv[1:7]
    print(json.dumps(run(m, d, i, int(r), int(t), float(temp))), flush=True)

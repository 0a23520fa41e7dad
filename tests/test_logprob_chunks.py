"""Training log-probs in blocks recomputed in backward (`forward._ChunkedLogprobs`): the same values and gradients
as the plain formula under autograd, no float32 [B, T, V] tensor kept for backward, and a lower measured peak than
the implementation it replaced on a 32k-vocabulary model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from rayrlhf.models import forward
from rayrlhf.models.architectures import build_architecture
from rayrlhf.models.forward import pack_batch, response_logits, token_logprobs
from rayrlhf.models.loading import load_policy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from logprob_measure import before_token_logprobs, measure  # noqa: E402

BIG_VOCAB = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
             "intermediate_size": 512, "vocab_size": 32000}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_architecture("llama", tmp_path_factory.mktemp("logp") / "model", vocab_size=512)


def _batch(vocab: int, rows: int, prompt: int, response: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, vocab, (prompt - i % 3,), generator=gen).tolist() for i in range(rows)]
    responses = [torch.randint(4, vocab, (response - 2 * (i % 2),), generator=gen).tolist() for i in range(rows)]
    return pack_batch(prompts, responses, pad_id=0)


def plain(model: torch.nn.Module, batch: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The formula as written, unchunked, under autograd: x = logits / T in float32, log p = x[y] - logsumexp(x)."""
    t_len = batch["mask"].shape[1]
    x = response_logits(model, batch).float() / temperature
    lse = torch.logsumexp(x, dim=-1)
    logp = x.gather(-1, batch["input_ids"][:, -t_len:, None]).squeeze(-1) - lse
    entropy = lse - (torch.softmax(x, -1) * x).sum(-1)
    return logp * batch["mask"], entropy.detach() * batch["mask"]


def grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("block", [1 << 24, 24 * 512, 5 * 512])  # one block; blocks of whole rows; inside a row
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_equal_the_plain_formula(model_dir: Path, monkeypatch: pytest.MonkeyPatch, block: int,
                                                      temperature: float) -> None:
    monkeypatch.setattr(forward, "_BLOCK_ELEMENTS", block)
    model = load_policy(model_dir, "float32").train()
    batch = _batch(model.config.vocab_size, rows=5, prompt=7, response=12)
    weights = torch.randn(batch["mask"].shape, generator=torch.Generator().manual_seed(2))  # a loss like PPO's
    logp, entropy = token_logprobs(model, batch, temperature, with_entropy=True)
    ref_logp, ref_entropy = plain(model, batch, temperature)
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=0)  # the same float32 operations in the same order
    torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=1e-5)  # softmax written another way
    ours = grads(model, (logp * weights).sum())
    theirs = grads(model, (ref_logp * weights).sum())
    assert ours.keys() == theirs.keys() and len(ours) == len(list(model.parameters()))
    for name in ours:  # bit for bit (measured); a tolerance would hide a wrong scale such as a missing 1/T
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)


def test_bf16_logits_get_gradients_in_bf16_equal_to_the_plain_formula(model_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forward, "_BLOCK_ELEMENTS", 24 * 512)
    model = load_policy(model_dir, "bfloat16").train()
    batch = _batch(model.config.vocab_size, rows=4, prompt=5, response=9)
    logp, _ = token_logprobs(model, batch, 0.7)
    ref_logp, _ = plain(model, batch, 0.7)
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=0)
    ours, theirs = grads(model, logp.sum()), grads(model, ref_logp.sum())
    for name in ours:  # bf16 parameters: the same rounding of the same float32 values
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)


def _saved_float32_logits(fn, model: torch.nn.Module, batch: dict) -> int:  # noqa: ANN001
    """Elements of the float32 tensors over the vocabulary that autograd keeps for backward in `fn`'s forward."""
    vocab, total = model.config.vocab_size, 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.dtype == torch.float32 and t.dim() and t.shape[-1] == vocab:
            total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, _ = fn(model, batch, 0.7, True)
    logp.sum().backward()
    return total


def test_no_float32_block_of_the_logits_is_kept_for_backward(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 model: before, every float32 block of the logits was kept (all of them: B x T x V); now none is."""
    monkeypatch.setattr(forward, "_BLOCK_ELEMENTS", 24 * 512)
    model = load_policy(model_dir, "bfloat16").train()
    batch = _batch(model.config.vocab_size, rows=4, prompt=5, response=9)
    rows, t_len = batch["mask"].shape
    assert _saved_float32_logits(before_token_logprobs, model, batch) >= rows * t_len * model.config.vocab_size
    assert _saved_float32_logits(token_logprobs, model, batch) == 0


@pytest.mark.slow
def test_measured_peak_falls_on_a_32k_vocabulary(tmp_path: Path) -> None:
    """One training forward + backward of 8 rows x 256 response tokens (temperature 0.7) through a 32k-vocabulary
    Llama, each implementation in its own process (tests/logprob_measure.py)."""
    model = build_architecture("llama", tmp_path / "big-vocab", **BIG_VOCAB)
    lines = []
    for dtype in ("bfloat16", "float32"):
        before = measure(model, dtype, "before", 8, 256, 0.7)
        after = measure(model, dtype, "chunked", 8, 256, 0.7)
        logits = after["logits_bytes"]
        lines.append(f"{dtype}: peak {before['peak_bytes'] / 2**20:.0f} MiB before, {after['peak_bytes'] / 2**20:.0f} MiB "
                     f"chunked ({after['peak_bytes'] / before['peak_bytes']:.2f}); the logits are {logits / 2**20:.0f} MiB")
        assert after["peak_bytes"] < before["peak_bytes"] - logits, lines[-1]  # at least a logits-sized tensor less
    print("\n" + "\n".join(lines))

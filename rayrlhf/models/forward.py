"""Batch layout and forward passes shared by trainers, the reference and the reward servers.

Layout: each row is its prompt left-padded to P tokens followed by its response right-padded
to T tokens, so `input_ids` is [B, P + T] and response token t sits at column P + t for every
row. The log-prob of response token t therefore comes from the logits at column P + t - 1.
This keeps every per-token quantity a dense [B, T] tensor with a right-padded `mask`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import cache
from typing import Any

import torch


def pack_batch(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
    masks: Sequence[Sequence[float] | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Pack token lists into `input_ids`, `attention_mask`, `position_ids` [B, P+T] and `mask` [B, T].

    `mask` is 1 on every response token, or, where `masks[i]` is given, that per-token loss mask
    (a conversation's response holds user and tool turns that are attended to but not trained on).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    num_rows = len(prompts)
    p_len = max((len(p) for p in prompts), default=0)
    t_len = max(max((len(r) for r in responses), default=0), 1)
    input_ids = torch.full((num_rows, p_len + t_len), pad_id, dtype=torch.long)
    attention = torch.zeros((num_rows, p_len + t_len), dtype=torch.long)
    mask = torch.zeros((num_rows, t_len), dtype=torch.float32)
    if masks is not None and len(masks) != num_rows:
        raise ValueError(f"{num_rows} responses but {len(masks)} masks")
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        input_ids[i, p_len - len(prompt) : p_len] = torch.as_tensor(prompt, dtype=torch.long)
        input_ids[i, p_len : p_len + len(response)] = torch.as_tensor(response, dtype=torch.long)
        attention[i, p_len - len(prompt) : p_len + len(response)] = 1
        row_mask = masks[i] if masks is not None else None
        if row_mask is None:
            mask[i, : len(response)] = 1.0
        elif len(row_mask) != len(response):
            raise ValueError(f"row {i}: a mask of {len(row_mask)} for a response of {len(response)} tokens")
        else:
            mask[i, : len(response)] = torch.as_tensor(row_mask, dtype=torch.float32)
    position_ids = (attention.cumsum(dim=1) - 1).clamp_min(0)
    return {"input_ids": input_ids, "attention_mask": attention, "position_ids": position_ids, "mask": mask}


_BLOCK_ELEMENTS = 1 << 24  # float32 elements per block of the log-softmax (64 MiB), forward and backward


def response_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [B, T, V] that predict each response token (column P + t - 1), in the model's dtype.

    Only the last T + 1 positions go through the output layer (`logits_to_keep`): the prompt's
    positions predict nothing we train on, and on long prompts the [B, P, V] logits are most of
    the memory. The model's own final scaling / soft-capping still applies.
    """
    t_len = batch["mask"].shape[1]
    return _model_logits(model, batch)[:, -t_len - 1 : -1, :]


def _model_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits [B, L, V] as it returns them; the last T + 1 positions hold the response's."""
    t_len = batch["mask"].shape[1]
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "position_ids": batch["position_ids"], "use_cache": False}
    if _takes_logits_to_keep(type(model)):  # custom (remote) code may predate it: full logits, same slice
        kwargs["logits_to_keep"] = t_len + 1
    return model(**kwargs).logits


@cache
def _takes_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def block_positions(vocab: int) -> int:
    """Positions per float32 block: _BLOCK_ELEMENTS over the vocabulary (524 at 32k, 110 at 152k)."""
    return max(1, _BLOCK_ELEMENTS // vocab)


def _chunks(rows: int, t_len: int, positions: int) -> list[tuple[slice, slice]]:
    """(rows, response columns) blocks of at most `positions` positions covering a [rows, t_len] grid."""
    if t_len <= positions:
        step = positions // t_len
        return [(slice(r, min(r + step, rows)), slice(0, t_len)) for r in range(0, rows, step)]
    return [(slice(r, r + 1), slice(c, min(c + positions, t_len))) for r in range(rows) for c in range(0, t_len, positions)]


class _ChunkedLogprobs(torch.autograd.Function):
    """log p(y_t) = x[y_t] - logsumexp(x) with x = logits / T in float32, one block of positions at a time.

    A block holds at most _BLOCK_ELEMENTS float32 values, whatever the vocabulary. Forward keeps only the
    logits the model produced (its own dtype, no copy) and the float32 log-sum-exp per position; backward
    recomputes each block's softmax from them: d log p / d logit = (onehot - softmax) / T.
    So no float32 [B, T, V] tensor is ever held (autograd on the plain formula keeps every float32 block for
    backward: 3x the bf16 logits), and the gradient is written block by block into one buffer in the logits'
    dtype. The operations are the plain formula's, in its order: gradients equal autograd's.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rows, t_len = targets.shape
        offset = logits.shape[1] - t_len - 1  # response position t is predicted at column offset + t
        logp = torch.empty(rows, t_len, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
        for rs, cs in _chunks(rows, t_len, block_positions(logits.shape[-1])):
            x = logits[rs, offset + cs.start : offset + cs.stop].float()
            if temperature != 1.0:
                x = x / temperature
            block_lse = torch.logsumexp(x, dim=-1)
            lse[rs, cs] = block_lse
            logp[rs, cs] = x.gather(-1, targets[rs, cs, None]).squeeze(-1) - block_lse
            if with_entropy:
                probs = torch.exp(x - block_lse[..., None])
                entropy[rs, cs] = block_lse - (probs * x).sum(-1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, grad_logp: torch.Tensor, _grad_entropy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, targets, lse = ctx.saved_tensors
        temperature = ctx.temperature
        rows, t_len = targets.shape
        offset = logits.shape[1] - t_len - 1
        grad = torch.zeros_like(logits)  # positions that predict no response token get none
        for rs, cs in _chunks(rows, t_len, block_positions(logits.shape[-1])):
            x = logits[rs, offset + cs.start : offset + cs.stop].float()
            if temperature != 1.0:
                x = x / temperature
            g_out = grad_logp[rs, cs, None]
            g = -(g_out * torch.exp(x - lse[rs, cs, None]))  # the log-sum-exp's share: -grad * softmax
            g.scatter_add_(-1, targets[rs, cs, None], g_out)  # the target logit's: +grad
            if temperature != 1.0:
                g = g / temperature
            grad[rs, offset + cs.start : offset + cs.stop] = g
        return grad, None, None, None


def token_logprobs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs [B, T] of the response tokens under log_softmax(logits / T) (0 on padding),
    and the entropy [B, T] when asked (a statistic: no gradient flows through it).

    log p(y) = logit(y) - logsumexp(logits), in float32, a block of positions at a time, with the
    blocks recomputed in backward (`_ChunkedLogprobs`): neither pass holds a float32 [B, T, V] tensor.
    """
    t_len = batch["mask"].shape[1]
    targets = batch["input_ids"][:, -t_len:]
    logp, entropy = _ChunkedLogprobs.apply(_model_logits(model, batch), targets, float(temperature), with_entropy)
    return logp * batch["mask"], (entropy * batch["mask"] if with_entropy else None)


def _score_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(backbone, `score` head) of a one-label sequence classifier, or None for another kind of model."""
    head = getattr(model, "score", None)
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if isinstance(head, torch.nn.Module) and isinstance(base, torch.nn.Module):
        return base, head
    return None


def _hidden(base: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return base(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
        use_cache=False,
    ).last_hidden_state


def token_values(critic: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Critic values [B, T]: the `score` head at the state before each response token (0 on padding)."""
    parts = _score_parts(critic)
    if parts is None:
        raise TypeError(f"a critic needs a backbone and a `score` head; {type(critic).__name__} has none")
    base, head = parts
    t_len = batch["mask"].shape[1]
    hidden = _hidden(base, batch)[:, -t_len - 1 : -1]
    return head(hidden)[..., 0].float() * batch["mask"]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last attended token (the last response token in our layout)."""
    cols = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (cols * attention_mask).argmax(dim=1)


def sequence_scores(reward_model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scores [B] of a one-label sequence classifier, read at each row's last attended token.

    Models with a `score` head (Llama, Qwen, Mistral families) are read at that exact column,
    independent of how the model pools (HF pools at the last non-pad *id*, which is wrong when
    the pad token doubles as EOS). Other classifiers fall back to their own pooled output.
    """
    parts = _score_parts(reward_model)
    if parts is not None:
        base, head = parts
        hidden = _hidden(base, batch)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return head(hidden[rows, last_token_index(batch["attention_mask"])])[:, 0].float()
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    return reward_model(**kwargs).logits[:, 0].float()

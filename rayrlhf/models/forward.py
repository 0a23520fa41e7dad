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


_LOGIT_ROWS = 2048  # positions per float32 log-sum-exp chunk: bounds the float32 copy of the logits


def response_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [B, T, V] that predict each response token (column P + t - 1), in the model's dtype.

    Only the last T + 1 positions go through the output layer (`logits_to_keep`): the prompt's
    positions predict nothing we train on, and on long prompts the [B, P, V] logits are most of
    the memory. The model's own final scaling / soft-capping still applies.
    """
    t_len = batch["mask"].shape[1]
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "position_ids": batch["position_ids"], "use_cache": False}
    if _takes_logits_to_keep(type(model)):  # custom (remote) code may predate it: full logits, same slice
        kwargs["logits_to_keep"] = t_len + 1
    return model(**kwargs).logits[:, -t_len - 1 : -1, :]


@cache
def _takes_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def token_logprobs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs [B, T] of the response tokens under log_softmax(logits / T) (0 on padding),
    and the entropy [B, T] when asked (a statistic: computed without autograd).

    log p(y) = logit(y) - logsumexp(logits), in float32, a chunk of positions at a time, so no
    full float32 [B, T, V] log-softmax is ever materialised.
    """
    logits = response_logits(model, batch)
    t_len = batch["mask"].shape[1]
    targets = batch["input_ids"][:, -t_len:]
    flat = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    logp_parts, entropy_parts = [], []
    for start in range(0, flat.shape[0], _LOGIT_ROWS):
        chunk = flat[start : start + _LOGIT_ROWS].float()
        if temperature != 1.0:
            chunk = chunk / temperature
        lse = torch.logsumexp(chunk, dim=-1)
        logp_parts.append(chunk.gather(-1, flat_targets[start : start + _LOGIT_ROWS, None]).squeeze(-1) - lse)
        if with_entropy:
            with torch.no_grad():
                probs = torch.exp(chunk - lse[:, None])
                entropy_parts.append(lse - (probs * chunk).sum(-1))
    logp = torch.cat(logp_parts).reshape(targets.shape) * batch["mask"]
    entropy = torch.cat(entropy_parts).reshape(targets.shape) * batch["mask"] if with_entropy else None
    return logp, entropy


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

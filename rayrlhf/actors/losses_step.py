"""Loss dispatch for one trainer rank: micro-batch splitting and exact global normalisation.

A trainer step sees only its rank's shard of a mini-batch, cut further into micro-batches.
To make the accumulated gradient exactly the gradient of the loss over the *whole* global
mini-batch, every micro-batch contributes ``aggregate(micro) * local_units / global_units``,
where the "units" are what the loss averages over (response tokens for token-mean, rows with
tokens for seq-mean-token-mean, rows for seq-mean-token-sum-norm and for sequence-level
losses). ``global_units`` are summed over all ranks before the first micro-batch. Summing the
contributions over micro-batches and ranks gives the global loss; the same weights make the
reported statistics global averages too.

Everything here is pure torch: ``forward`` is a callable that runs the (DeepSpeed-wrapped)
model on one packed sub-batch, so the file is testable without Ray or DeepSpeed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from rayrlhf.algorithms import (
    aggregate_loss,
    bradley_terry_loss,
    dpo_loss,
    gspo_policy_loss,
    kl_estimate,
    masked_mean,
    ppo_policy_loss,
    sequence_importance_weights,
    sequence_logprob,
    sft_nll_loss,
    truncated_importance_weights,
    value_loss,
)

Batch = dict[str, torch.Tensor]
# forward(packed sub-batch, with_entropy, temperature) -> the role's outputs ("logp", "values" or "scores")
Forward = Callable[[Batch, bool, float], dict[str, torch.Tensor]]

# Which trainer role each loss trains.
LOSS_ROLES: dict[str, str] = {"ppo": "policy", "sft": "policy", "dpo": "policy", "value": "critic", "bt": "reward"}
PACKED_KEYS = ("input_ids", "attention_mask", "position_ids", "mask")
PTX_PREFIX = "ptx_"
PAIR_PREFIXES = ("chosen_", "rejected_")


@dataclass
class PassResult:
    """One forward/backward pass: its share of the global loss and its weighted statistics."""

    loss: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


def sub_batch(batch: Batch, prefix: str) -> Batch:
    """The packed sub-batch whose keys carry `prefix` (e.g. ``chosen_input_ids`` -> ``input_ids``)."""
    missing = [prefix + k for k in PACKED_KEYS if prefix + k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing} (a packed sub-batch needs {[prefix + k for k in PACKED_KEYS]})")
    return {k: batch[prefix + k] for k in PACKED_KEYS}


def num_rows(batch: Batch, prefix_filter: Callable[[str], bool]) -> int:
    """Rows shared by every tensor whose key passes `prefix_filter`; inconsistent row counts are an error."""
    rows = {k: int(v.shape[0]) for k, v in batch.items() if prefix_filter(k)}
    if not rows:
        return 0
    if len(set(rows.values())) != 1:
        raise ValueError(f"batch tensors disagree on the number of rows: {rows}")
    return next(iter(rows.values()))


def is_main_key(key: str) -> bool:
    return not key.startswith(PTX_PREFIX)


def split_rows(batch: Batch, n_chunks: int, keep: Callable[[str], bool]) -> list[Batch]:
    """Contiguous row chunks (as equal as possible) of the tensors whose keys pass `keep`; empty chunks dropped."""
    keys = [k for k in batch if keep(k)]
    if not keys:
        return []
    parts = {k: torch.tensor_split(batch[k], n_chunks) for k in keys}
    chunks = [{k: parts[k][i] for k in keys} for i in range(n_chunks)]
    return [c for c in chunks if c[keys[0]].shape[0] > 0]


def num_micro_batches(batch: Batch, micro_batch_size: int | None, micro_batch_tokens: int) -> int:
    """How many micro-batches this shard's rows go in: `micro_batch_size` rows each, or, when it is None,
    as few as keep rows x padded length within `micro_batch_tokens` (the same on every rank: shards have
    equal rows and the step's common width)."""
    rows = num_rows(batch, is_main_key)
    if micro_batch_size:
        return max(1, math.ceil(rows / micro_batch_size))
    width = sum(v.shape[1] for k, v in batch.items() if k.endswith("input_ids") and is_main_key(k))
    return max(1, math.ceil(rows * width / micro_batch_tokens))


def _owner(key: str) -> str:
    """The packed sub-batch a key belongs to: its prefix, "" for the main one."""
    return next((p for p in (PTX_PREFIX, *PAIR_PREFIXES) if key.startswith(p)), "")


def trim_padding(mb: Batch) -> Batch:
    """`mb` without the columns that are padding in all its rows: prompt columns before the first
    attended one, response columns after the last one with a nonzero mask (a conversation's mask has
    zeros between its trained turns). The layout stays `pack_batch`'s."""
    out = dict(mb)
    for prefix in {_owner(k) for k in mb if k.endswith("input_ids")}:
        mask, attention = mb[prefix + "mask"], mb[prefix + "attention_mask"]
        t_len, width = mask.shape[1], attention.shape[1]
        used = (mask != 0).any(dim=0).nonzero()
        keep_t = int(used[-1]) + 1 if len(used) else 1
        attended = (attention != 0).any(dim=0).nonzero()
        start = min(int(attended[0]) if len(attended) else 0, width - t_len - 1)  # keep at least one prompt column
        for key, value in mb.items():
            if _owner(key) != prefix or value.dim() != 2:
                continue
            if key.removeprefix(prefix) in ("input_ids", "attention_mask", "position_ids"):
                out[key] = value[:, start : width - t_len + keep_t]
            elif value.shape[1] == t_len:  # per-token: mask, old_logp, advantages, ref_logp, values, returns
                out[key] = value[:, :keep_t]
    return out


def concat_packed(parts: list[Batch]) -> Batch:
    """Stack packed sub-batches of different prompt (P) / response (T) widths into one batch.

    Prompts are left-padded and responses right-padded to the widest, so column P + t is still
    response token t in every row and one forward pass serves chosen and rejected together.
    """
    t_max = max(p["mask"].shape[1] for p in parts)
    p_max = max(p["input_ids"].shape[1] - p["mask"].shape[1] for p in parts)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in PACKED_KEYS}
    for p in parts:
        t_len = p["mask"].shape[1]
        left, right = p_max - (p["input_ids"].shape[1] - t_len), t_max - t_len
        out["input_ids"].append(F.pad(p["input_ids"], (left, right), value=0))
        out["attention_mask"].append(F.pad(p["attention_mask"], (left, right), value=0))
        out["position_ids"].append(F.pad(p["position_ids"], (left, 0), value=0))
        if right:
            last = out["position_ids"][-1][:, -1:]
            out["position_ids"][-1] = torch.cat([out["position_ids"][-1], last.expand(-1, right)], dim=1)
        out["mask"].append(F.pad(p["mask"], (0, right), value=0))
    return {k: torch.cat(v, dim=0) for k, v in out.items()}


def agg_units(mask: torch.Tensor, agg: str) -> float:
    """How many things `aggregate_loss(.., agg)` averages over in this (sub-)batch."""
    if agg == "token-mean":
        return float((mask != 0).sum())
    if agg == "seq-mean-token-mean":
        return float((mask != 0).any(dim=-1).sum())
    if agg == "seq-mean-token-sum-norm":
        return float(mask.shape[0])
    raise ValueError(f"unknown loss aggregation {agg!r}")


def _f(t: torch.Tensor) -> float:
    return float(t.detach())


def _share(local: float, total: float) -> float:
    return local / total if total > 0 else 0.0


_COMMON_ARGS = {"agg", "agg_constant", "temperature"}
LOSS_ARGS: dict[str, set[str]] = {
    "ppo": _COMMON_ARGS | {"clip_eps", "clip_eps_high", "kl_coef", "kl_estimator", "ptx_coef", "is_cap", "policy_loss"},
    "value": _COMMON_ARGS | {"value_clip_eps"},
    "sft": _COMMON_ARGS,
    "bt": set(),
    "dpo": {"beta", "label_smoothing", "temperature"},
}
POLICY_LOSSES = ("ppo", "gspo", "gspo_token")
_EXTRA_KEYS = {"ppo": ("advantages",), "value": ("old_values", "returns"),
               "dpo": ("ref_chosen_logp", "ref_rejected_logp")}


def validate(loss: str, batch: Batch, args: dict[str, Any]) -> None:
    """Reject a malformed step before any rank enters a collective, naming the loss and the keys."""
    if loss not in LOSS_ARGS:
        raise ValueError(f"unknown loss {loss!r}; valid losses are {sorted(LOSS_ARGS)}")
    unknown = sorted(set(args) - LOSS_ARGS[loss])
    if unknown:
        raise ValueError(f"loss {loss!r}: unknown loss_args {unknown}; valid ones are {sorted(LOSS_ARGS[loss])}")
    if args.get("policy_loss", "ppo") not in POLICY_LOSSES:
        raise ValueError(f"loss {loss!r}: unknown policy_loss {args['policy_loss']!r}; valid ones are {list(POLICY_LOSSES)}")
    prefixes = list(PAIR_PREFIXES) if loss in ("bt", "dpo") else [""]
    if loss == "ppo" and float(args.get("ptx_coef", 0.0)) > 0:
        prefixes.append(PTX_PREFIX)
    for prefix in prefixes:
        packed = sub_batch(batch, prefix)
        if packed["input_ids"].shape[1] <= packed["mask"].shape[1]:
            raise ValueError(
                f"loss {loss!r}: {prefix}input_ids has no prompt column before the {packed['mask'].shape[1]} response "
                "columns; the first response token needs a token to be predicted from (pack plain text as "
                "prompt=[first token], response=rest)"
            )
    needed = list(_EXTRA_KEYS.get(loss, ()))
    if loss == "ppo" and float(args.get("kl_coef", 0.0)) > 0:
        needed.append("ref_logp")
    if loss == "ppo" and args.get("is_cap") is not None:
        needed.append("sample_logp")
    missing = [k for k in needed if k not in batch]
    if missing:
        raise ValueError(f"loss {loss!r} needs batch keys {missing} (with these loss_args: {args})")


def count_units(loss: str, batch: Batch, args: dict[str, Any]) -> dict[str, float]:
    """This shard's normalisers; the trainer sums them over ranks before any micro-batch runs."""
    agg = args.get("agg", "token-mean")
    if loss in ("ppo", "sft", "value"):
        mask = batch["mask"]
        units = {"main": agg_units(mask, agg), "tokens": float((mask != 0).sum())}
        if loss == "ppo":  # sequence-level statistics (GSPO's clipfrac and importance weights) average over these
            units["rows"] = float((mask != 0).any(dim=-1).sum())
        if loss == "ppo" and args.get("ptx_coef", 0.0) > 0:
            units["ptx_tokens"] = float((sub_batch(batch, PTX_PREFIX)["mask"] != 0).sum())
        return units
    if loss in ("bt", "dpo"):
        return {"pairs": float(num_rows(batch, is_main_key))}
    raise ValueError(f"unknown loss {loss!r}; valid losses are {sorted(LOSS_ROLES)}")


def _ppo(forward: Forward, mb: Batch, args: dict[str, Any], totals: dict[str, float]) -> PassResult:
    agg = args.get("agg", "token-mean")
    out = forward(sub_batch(mb, ""), True, float(args.get("temperature", 1.0)))
    logp, mask = out["logp"], mb["mask"]
    # Without old_logp the step makes one update on samples of the current weights: the old
    # policy is the current one, and its detached log-probs are exact (no separate forward).
    old_logp = mb["old_logp"] if "old_logp" in mb else logp.detach()
    tw = _share(float((mask != 0).sum()), totals["tokens"])
    policy_loss = args.get("policy_loss", "ppo")
    rw = _share(float((mask != 0).any(dim=-1).sum()), totals.get("rows", 0.0))  # this pass's share of sequences
    stats: dict[str, float] = {}
    weights = None
    if args.get("is_cap") is not None:  # samples of older weights: old_logp is the proximal policy
        # PPO reweights each token; GSPO each sequence, by the length-normalised ratio it clips too.
        tis = truncated_importance_weights if policy_loss == "ppo" else sequence_importance_weights
        weights, is_stats = tis(old_logp, mb["sample_logp"], mask, float(args["is_cap"]))
        iw = tw if policy_loss == "ppo" else rw
        stats.update({k: float(v) * iw for k, v in is_stats.items() if k != "is_weight_max"})  # sums over passes
    common = dict(clip_eps=args.get("clip_eps", 0.2), clip_eps_high=args.get("clip_eps_high"), agg=agg,
                  agg_constant=args.get("agg_constant"), weights=weights)
    if policy_loss == "ppo":
        pg, st = ppo_policy_loss(logp, old_logp, mb["advantages"], mask, **common)
    else:
        pg, st = gspo_policy_loss(logp, old_logp, mb["advantages"], mask, token_level=policy_loss == "gspo_token", **common)
    w = _share(agg_units(mask, agg), totals["main"])
    total = pg
    cw = rw if policy_loss == "gspo" else tw  # GSPO clips (and counts clipped) sequences
    stats.update({"pg_loss": _f(pg) * w, "clipfrac": float(st["clipfrac"]) * cw, "approx_kl": float(st["approx_kl"]) * tw})
    kl_coef = float(args.get("kl_coef", 0.0))
    if kl_coef > 0:
        kl = kl_estimate(logp, mb["ref_logp"].to(logp.dtype), args.get("kl_estimator", "k3"))
        total = total + kl_coef * aggregate_loss(kl, mask, agg, args.get("agg_constant"))
        stats["kl"] = float(masked_mean(kl.detach(), mask)) * tw
    if "entropy" in out:
        stats["entropy"] = float(masked_mean(out["entropy"].detach(), mask)) * tw
    if "sample_logp" in mb:  # the engine's log-probs of these tokens: how far it is from this forward
        gap = kl_estimate(mb["sample_logp"].to(logp.dtype), logp.detach(), "k3")
        stats["logprob_mismatch"] = float(masked_mean(gap, mask)) * tw
    loss = total * w
    stats["loss"] = _f(loss)
    return PassResult(loss, stats)


def _ptx(forward: Forward, mb: Batch, args: dict[str, Any], totals: dict[str, float]) -> PassResult:
    """PPO-ptx: pretraining NLL (token mean over the global ptx sub-batch), weighted by ptx_coef."""
    ptx = sub_batch(mb, PTX_PREFIX)
    logp = forward(ptx, False, 1.0)["logp"]  # the untempered model, as in pretraining
    nll = sft_nll_loss(logp, ptx["mask"]) * _share(float((ptx["mask"] != 0).sum()), totals["ptx_tokens"])
    loss = float(args["ptx_coef"]) * nll
    return PassResult(loss, {"ptx_loss": _f(nll), "loss": _f(loss)})


def _sft(forward: Forward, mb: Batch, args: dict[str, Any], totals: dict[str, float]) -> PassResult:
    agg = args.get("agg", "token-mean")
    logp = forward(sub_batch(mb, ""), False, float(args.get("temperature", 1.0)))["logp"]
    loss = sft_nll_loss(logp, mb["mask"], agg, args.get("agg_constant")) * _share(agg_units(mb["mask"], agg), totals["main"])
    return PassResult(loss, {"loss": _f(loss)})


def _value(forward: Forward, mb: Batch, args: dict[str, Any], totals: dict[str, float]) -> PassResult:
    agg = args.get("agg", "token-mean")
    values = forward(sub_batch(mb, ""), False, 1.0)["values"]
    mask = mb["mask"]
    vl, st = value_loss(
        values, mb["old_values"], mb["returns"], mask, clip_eps=args.get("value_clip_eps", 0.2),
        agg=agg, agg_constant=args.get("agg_constant"),
    )
    loss = vl * _share(agg_units(mask, agg), totals["main"])
    tw = _share(float((mask != 0).sum()), totals["tokens"])
    return PassResult(loss, {
        "loss": _f(loss), "vf_clipfrac": float(st["vf_clipfrac"]) * tw,
        "values_mean": float(masked_mean(values.detach(), mask)) * tw,
    })


def _pairs(forward: Forward, mb: Batch, temperature: float = 1.0) -> tuple[dict[str, torch.Tensor], int]:
    parts = [sub_batch(mb, p) for p in PAIR_PREFIXES]
    return forward(concat_packed(parts), False, temperature), parts[0]["mask"].shape[0]


def _bt(forward: Forward, mb: Batch, args: dict[str, Any], totals: dict[str, float]) -> PassResult:
    out, n = _pairs(forward, mb)
    chosen, rejected = out["scores"][:n], out["scores"][n:]
    w = _share(n, totals["pairs"])
    loss = bradley_terry_loss(chosen, rejected) * w
    diff = (chosen - rejected).detach()
    return PassResult(loss, {
        "loss": _f(loss), "accuracy": float((diff > 0).float().mean()) * w, "margin": float(diff.mean()) * w,
    })


def _dpo(forward: Forward, mb: Batch, args: dict[str, Any], totals: dict[str, float]) -> PassResult:
    out, n = _pairs(forward, mb, float(args.get("temperature", 1.0)))
    mask = concat_packed([sub_batch(mb, p) for p in PAIR_PREFIXES])["mask"]
    seq = sequence_logprob(out["logp"], mask)
    mean_loss, r_chosen, r_rejected = dpo_loss(
        seq[:n], seq[n:], mb["ref_chosen_logp"].to(seq.dtype), mb["ref_rejected_logp"].to(seq.dtype),
        beta=float(args.get("beta", 0.1)), label_smoothing=float(args.get("label_smoothing", 0.0)),
    )
    w = _share(n, totals["pairs"])
    loss = mean_loss * w
    margin = r_chosen - r_rejected
    return PassResult(loss, {
        "loss": _f(loss), "accuracy": float((margin > 0).float().mean()) * w, "margin": float(margin.mean()) * w,
        "chosen_reward": float(r_chosen.mean()) * w, "rejected_reward": float(r_rejected.mean()) * w,
    })


_MAIN_PASSES = {"ppo": _ppo, "sft": _sft, "value": _value, "bt": _bt, "dpo": _dpo}


def plan_passes(
    loss: str, batch: Batch, args: dict[str, Any], micro_batch_size: int | None, micro_batch_tokens: int = 8192,
) -> list[Callable[[Forward, dict[str, float]], PassResult]]:
    """The forward/backward passes of one step on this shard, in order.

    One pass per micro-batch, plus (PPO-ptx) one per non-empty micro-chunk of the ``ptx_``
    sub-batch, which is cut into as many chunks as the main rows. Ranks hold equal shards, so
    every rank plans the same number of passes (ZeRO-3 needs every rank in every forward).
    """
    if loss not in _MAIN_PASSES:
        raise ValueError(f"unknown loss {loss!r}; valid losses are {sorted(LOSS_ROLES)}")
    n_micro = num_micro_batches(batch, micro_batch_size, micro_batch_tokens)
    if args.get("agg") == "seq-mean-token-sum-norm" and args.get("agg_constant") is None and "mask" in batch:
        # Dr. GRPO's constant is one length for the whole step, not each (trimmed) micro-batch's width
        args = {**args, "agg_constant": float(batch["mask"].shape[1])}
    main_fn = _MAIN_PASSES[loss]
    passes = [
        (lambda fwd, totals, mb=mb: main_fn(fwd, mb, args, totals))
        for mb in map(trim_padding, split_rows(batch, n_micro, is_main_key))
    ]
    if loss == "ppo" and float(args.get("ptx_coef", 0.0)) > 0:
        ptx_chunks = split_rows(batch, n_micro, lambda k: k.startswith(PTX_PREFIX))
        if not ptx_chunks:
            raise ValueError("ptx_coef > 0 needs a 'ptx_' packed sub-batch (ptx_input_ids, ptx_attention_mask, ...)")
        passes += [(lambda fwd, totals, mb=mb: _ptx(fwd, mb, args, totals)) for mb in map(trim_padding, ptx_chunks)]
    return passes

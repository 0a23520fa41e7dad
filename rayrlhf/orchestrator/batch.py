"""From scored samples to one training batch: every sample of a step in prompt order (groups contiguous), with
the per-token tensors the update needs, for single responses and multi-turn episodes alike.

An episode's row differs in three ways: its `mask` is the loss mask (1 on the tokens the policy sampled, 0 on
the environment's and the template's), its `turn_rewards` put each turn's reward on that turn's last policy
token, and it is left out of the update (`valid` False) when its environment failed.
"""

from __future__ import annotations

from typing import Any

import torch

from rayrlhf.actors.types import Completion
from rayrlhf.models.forward import pack_batch

Scored = list[tuple[list[Completion], dict[str, Any]]]
PER_TOKEN = ("ref_logp", "logp", "entropy", "values")


def pad_rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Stack 1-D tensors of different lengths into [B, width], right-padded with zeros."""
    out = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def assemble(scored: Scored, pad_id: int) -> dict[str, Any]:
    """One batch of all samples, groups contiguous (prompt position, then sample index)."""
    rows = []
    for completions, res in scored:
        for i, c in enumerate(completions):
            n = len(c.response_ids)
            per_token = {k: res[k][i, :n] for k in PER_TOKEN if res.get(k) is not None}
            per_token["sample_logp"] = torch.tensor(c.logprobs, dtype=torch.float32)
            parts = {name: values[i] for name, values in res.get("reward_parts", {}).items()}
            rows.append((res["positions"][i], c.sample_index, c, per_token, res["scores"][i], res["rows"][i], parts))
    rows.sort(key=lambda r: (r[0], r[1]))
    completions = [r[2] for r in rows]
    episodes = any(c.loss_mask is not None for c in completions)
    batch = pack_batch([c.prompt_ids for c in completions], [c.response_ids for c in completions], pad_id,
                       masks=[c.loss_mask for c in completions] if episodes else None)
    width = batch["mask"].shape[1]
    for key in rows[0][3]:
        batch[key] = pad_rows([r[3][key] for r in rows], width)
    scores = [r[4] for r in rows]
    batch["scores"] = torch.tensor([float("nan") if s is None else s for s in scores])
    batch["valid"] = torch.tensor([s is not None and c.env_error is None for s, c in zip(scores, completions, strict=True)])
    batch["truncated"] = torch.tensor([c.truncated for c in completions])
    batch["response_len"] = torch.tensor([len(c.response_ids) for c in completions], dtype=torch.float32)
    batch["versions"] = [c.weight_version for c in completions]
    batch["probe"] = (completions[0].prompt_ids, completions[0].response_ids)  # for System.probe_mismatch
    batch["completions"], batch["positions"], batch["rows"] = completions, [r[0] for r in rows], [r[5] for r in rows]
    batch["reward_parts"] = {name: [r[6].get(name) for r in rows] for name in rows[0][6]}
    if episodes:
        turn_rewards = torch.zeros(len(rows), width)
        for i, c in enumerate(completions):
            for position, reward in c.turn_rewards or ():
                turn_rewards[i, position] += reward
        batch["turn_rewards"] = turn_rewards
    return batch


def episode_metrics(completions: list[Completion], mask: torch.Tensor) -> dict[str, float]:
    """`env/...` and token figures of a step's episodes (empty for single-turn samples)."""
    if not any(c.loss_mask is not None for c in completions):
        return {}
    n = len(completions)
    info = [c.env_info or {} for c in completions]
    policy = mask.sum(dim=1)
    total = torch.tensor([float(len(c.response_ids)) for c in completions])
    out = {
        "env/turns_mean": sum(i.get("turns", 0.0) for i in info) / n,
        "env/tool_calls_mean": sum(i.get("tool_calls", 0.0) for i in info) / n,
        "env/tool_errors": int(sum(i.get("tool_errors", 0.0) for i in info)),
        "env/failed": sum(1 for c in completions if c.env_error is not None),
        "env/step_s": sum(i.get("step_s", 0.0) for i in info) / max(1.0, sum(i.get("turns", 0.0) for i in info)),
        "env/reward_mean": sum(c.env_reward for c in completions) / n,
        "response/policy_tokens_mean": float(policy.mean()),
        "response/env_tokens_mean": float((total - policy).mean()),
    }
    for reason in ("done", "max_turns", "max_tokens", "failed"):
        out[f"env/end_reason/{reason}"] = sum(1 for c in completions if c.end_reason == reason)
    return out

"""What the model actually said: `rollout.dump_every: N` writes `samples/step_<N>.jsonl` every N steps.

One JSON object per sample: the step, which data row it answers (`row`, its index in data.train, and
`position` in the step), the sample index, the request id and the worker that sampled it with its weight
version, the prompt and the turns (role, text, token count, whether the policy is trained on them), the
score, the advantage and whether the reward could score it. People read these to see what the reward
is rewarding; the chaos tests read them to prove which samples a step trained on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def write_samples(folder: Path, step: int, exp: dict[str, Any], advantages: torch.Tensor, mask: torch.Tensor,
                  tokenizer: Any, prompts: list[str]) -> Path:
    """Write one step's samples (`exp` as `OnlineRL._assemble` builds it, `prompts` the data rows' prompts in
    the same order) to folder/step_<step>.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step}.jsonl"
    per_seq = (advantages * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)
    with path.open("w") as fh:
        for k, c in enumerate(exp["completions"]):
            row = {
                "step": step, "row": exp["rows"][k], "position": exp["positions"][k], "sample_index": c.sample_index,
                "request_id": c.request_id, "worker": c.worker, "weight_version": c.weight_version,
                "prompt": prompts[k],
                "turns": c.turns if c.turns is not None else [
                    {"role": "assistant", "text": tokenizer.decode(c.response_ids, skip_special_tokens=True),
                     "tokens": len(c.response_ids), "trained": True}],
                "finish_reason": c.finish_reason,
                "score": None if not bool(exp["valid"][k]) else float(exp["scores"][k]) + c.env_reward,
                "advantage": float(per_seq[k]),
                **({"end_reason": c.end_reason, "env_error": c.env_error, "turn_rewards": [r for _, r in c.turn_rewards or ()],
                    "policy_tokens": int(sum(c.loss_mask)), "env_tokens": len(c.loss_mask) - int(sum(c.loss_mask))}
                   if c.loss_mask is not None else {}),
            }
            fh.write(json.dumps(row) + "\n")
    return path


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

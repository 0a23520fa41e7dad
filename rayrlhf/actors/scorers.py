"""The frozen reference policy's server, a thin Ray actor around `rayrlhf.models.forward` that holds no
optimizer and never changes its weights. The reward server is in `rayrlhf.actors.reward_server`.
"""

from __future__ import annotations

import logging

import ray
import torch

from rayrlhf.actors.health import identity
from rayrlhf.models.forward import token_logprobs
from rayrlhf.models.loading import load_policy

log = logging.getLogger(__name__)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _micro_batches(batch: dict[str, torch.Tensor], size: int):
    rows = batch["input_ids"].shape[0]
    for start in range(0, rows, size):
        yield {k: v[start : start + size] for k, v in batch.items()}


class ReferenceServer:
    """The frozen reference policy π_ref: per-token log-probs of response tokens for the KL term."""

    def __init__(
        self, model_path: str, dtype: str = "auto", trust_remote_code: bool = False, micro_batch_size: int = 16,
        temperature: float = 1.0, no_dropout: bool = True,
    ) -> None:
        self.device = _device()
        self.model = load_policy(model_path, dtype, trust_remote_code, no_dropout).to(self.device).eval()
        self.micro_batch_size = micro_batch_size
        self.temperature = temperature

    def ready(self) -> bool:
        return True

    def identity(self) -> tuple[str, int]:
        """(node id, pid), for a stack dump from outside should this server hang."""
        return identity()

    @torch.no_grad()
    def logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log π_ref(y_t | x, y_<t) as [B, T] (0 on padding), computed in micro-batches."""
        parts = []
        for mb in _micro_batches(batch, self.micro_batch_size):
            mb = {k: v.to(self.device) for k, v in mb.items()}
            parts.append(token_logprobs(self.model, mb, self.temperature)[0].cpu())
        return torch.cat(parts)


RemoteReferenceServer = ray.remote(ReferenceServer)

"""Small helpers shared by the hand-computed reference tests of the RL math."""

from __future__ import annotations

import math

import torch


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def lengths_to_mask(lengths: list[int], num_tokens: int) -> torch.Tensor:
    return (torch.arange(num_tokens)[None, :] < torch.tensor(lengths)[:, None]).float()


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))

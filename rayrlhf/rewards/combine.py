"""Several reward functions with weights (`reward.functions`): the combined score of each sample.

Recipes score one response on several things at once (the answer is right, it is formatted as
asked, it is not too long); each part is a separate function and a separate metric, and the
training score is their weighted sum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["weighted_sum"]


def weighted_sum(
    parts: Mapping[str, Sequence[float | None]], weights: Mapping[str, float]
) -> list[float | None]:
    """Per sample ``sum(weights[name] * parts[name][i])``; None when a part with a non-zero weight is None.

    A sample one function could not score has no defined sum: counting the missing part as 0 would
    train on a score that was never given, so the sample is unscored (left out of the update and
    counted in reward/failed). A part of weight 0 is only logged: its None costs nothing.
    """
    if set(parts) != set(weights):
        raise ValueError(f"parts {sorted(parts)} and weights {sorted(weights)} name different functions")
    lengths = {name: len(scores) for name, scores in parts.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"reward functions returned different numbers of scores: {lengths}")
    n = next(iter(lengths.values()), 0)
    out: list[float | None] = []
    for i in range(n):
        total: float | None = 0.0
        for name, scores in parts.items():
            if weights[name] == 0:
                continue
            value = scores[i]
            if value is None:
                total = None
                break
            total += weights[name] * value
        out.append(total)
    return out

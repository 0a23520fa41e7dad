"""Evaluation with several samples per prompt: mean@n and the unbiased pass@k (Chen et al. 2021).

Sampling n responses per prompt and asking how often at least one of k is correct measures what
the policy can reach, not only what it usually says; RL on verifiable rewards is often judged by
pass@1 (the share of correct samples) beside pass@k for larger k. Plain Python: the inputs are a
handful of scores per prompt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["pass_at_k", "sample_metrics"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n, c of them
    correct, is correct: ``1 - C(n - c, k) / C(n, k)`` (unbiased for the pass@k of the policy).

    Computed as ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``, which needs no large binomials.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n = {n} samples per prompt")
    if n - c < k:
        return 1.0  # every draw of k contains a correct sample
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def sample_metrics(
    scores: Sequence[Sequence[float | None]], ks: Sequence[int], threshold: float
) -> dict[str, float]:
    """Per-prompt lists of sample scores -> ``mean@n`` and ``pass@k`` for each k in ``ks``.

    A sample is correct when its score is ``>= threshold``; an unscored sample (None) counts as a
    sample that is not correct, so lost scores cannot raise pass@k. ``mean@n`` is the mean over
    prompts of each prompt's mean scored sample (prompts without any scored sample are left out;
    NaN when no prompt has one); ``pass@k`` is the mean over prompts of ``pass_at_k``. ``n`` is the
    number of samples of a prompt (every prompt must have at least max(ks)). Keys: ``mean@<n>``
    (n of the first prompt; ``mean@n`` when prompts differ), ``pass@<k>``, ``prompts``.
    """
    if not scores:
        return {"prompts": 0.0}
    sizes = {len(s) for s in scores}
    if min(sizes) < max(ks, default=1):
        raise ValueError(f"pass@{max(ks)} needs at least {max(ks)} samples of every prompt, got {min(sizes)}")
    means = [sum(v) / len(v) for v in ([x for x in s if x is not None] for s in scores) if v]
    out = {f"mean@{sizes.pop()}" if len(sizes) == 1 else "mean@n": sum(means) / len(means) if means else math.nan}
    correct = [sum(x is not None and x >= threshold for x in s) for s in scores]
    for k in ks:
        out[f"pass@{k}"] = sum(pass_at_k(len(s), c, k) for s, c in zip(scores, correct, strict=True)) / len(scores)
    out["prompts"] = float(len(scores))
    return out

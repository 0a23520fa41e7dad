"""Reward functions: loading `file.py:fn` / `module:fn`, and calling them without losing samples.

A reward function is `fn(prompts, responses, **columns) -> list[float | None]` (DESIGN.md).
A sample it cannot score (it returns None for it, raises on it, or the call times out) is
marked None: the orchestrator leaves it out of the update and counts it in `reward/failed`.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import importlib.util
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rayrlhf.errors import InvalidInput

log = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float | None]]


def load_reward_function(spec: str) -> RewardFn:
    """Resolve 'path/to/file.py:fn' or 'package.module:fn' to the function, with errors naming the spec."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise InvalidInput(f"reward.function {spec!r}: expected 'path/to/file.py:fn' or 'package.module:fn'")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise InvalidInput(f"reward.function {spec!r}: file {path} does not exist")
        module_name = f"rayrlhf_user_reward_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise InvalidInput(f"reward.function {spec!r}: cannot load {path} as Python")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            raise InvalidInput(f"reward.function {spec!r}: importing {path} failed: {exc!r}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise InvalidInput(f"reward.function {spec!r}: cannot import module {target!r} ({exc})") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise InvalidInput(f"reward.function {spec!r}: {target} has no function {name!r}")
    return fn


def _clean(value: Any) -> float | None:
    """A finite float, or None for anything that is not a usable score."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _call(fn: RewardFn, prompts: list[str], responses: list[str], columns: dict[str, list], timeout_s: float) -> list:
    """One call of `fn` in a worker thread; raises TimeoutError past `timeout_s`.

    A timed-out call cannot be killed (Python threads cannot be), so it is abandoned: keep
    reward functions free of unbounded loops.
    """
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        future = pool.submit(fn, prompts, responses, **columns)
        result = list(future.result(timeout=timeout_s))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    if len(result) != len(prompts):
        raise ValueError(f"returned {len(result)} rewards for {len(prompts)} samples")
    return result


def score_with_function(
    fn: RewardFn, prompts: list[str], responses: list[str], columns: dict[str, list], timeout_s: float = 30.0
) -> list[float | None]:
    """Score a batch; when the batch call fails, score sample by sample so one bad sample costs only itself."""
    try:
        return [_clean(v) for v in _call(fn, prompts, responses, columns, timeout_s)]
    except Exception as exc:  # noqa: BLE001 - any failure of user code is isolated per sample below
        log.warning("reward function failed on a batch of %d (%r); scoring one by one", len(prompts), exc)
    scores: list[float | None] = []
    for i in range(len(prompts)):
        row = {k: [v[i]] for k, v in columns.items()}
        try:
            scores.append(_clean(_call(fn, [prompts[i]], [responses[i]], row, timeout_s)[0]))
        except Exception as exc:  # noqa: BLE001
            log.warning("reward function failed on sample %d: %r", i, exc)
            scores.append(None)
    return scores

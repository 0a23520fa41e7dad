"""Atomic, complete checkpoints: `checkpoints/step_N/` and `checkpoints/latest`.

A checkpoint is written into a temporary folder, renamed into place when complete, and only
then does `latest` (a one-line file naming the folder) move to it. A crash at any point
leaves the previous checkpoint intact and `latest` pointing at a complete one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rayrlhf.rng import rng_state, set_rng_state

log = logging.getLogger(__name__)

STATE_FILE = "orchestrator.json"
RNG_FILE = "rng.pt"
ROLLOUTS_FILE = "rollouts.pt"


def save_checkpoint(
    root: Path, step: int, state: dict[str, Any], save_trainers: Callable[[Path], None], keep_last: int,
    rollouts: dict[int, Any] | None = None,
) -> Path:
    """Write step `step`: trainers (via `save_trainers(folder)`), orchestrator state, RNG and the
    buffered rollouts of later steps (asynchronous mode), atomically.

    The state file is written last: a folder holding it is complete. Re-saving a step that exists (the
    step `latest` names, say) moves the old folder aside before the new one takes its name, and
    `latest_checkpoint` finds whichever complete copy a crash between the two renames left."""
    root.mkdir(parents=True, exist_ok=True)
    final, tmp, old = root / f"step_{step}", root / f".tmp-step_{step}", root / f".old-step_{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_trainers(tmp)
    torch.save(rng_state(), tmp / RNG_FILE)
    if rollouts:
        torch.save(rollouts, tmp / ROLLOUTS_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))  # last: the folder is complete from here on
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, root / "latest")
    shutil.rmtree(old, ignore_errors=True)
    _prune(root, keep_last, step)
    log.info("checkpoint saved: %s", final)
    return final


def _complete(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file()


def latest_checkpoint(root: Path) -> Path | None:
    """The folder `latest` names, or None when there is no complete checkpoint. When a crash interrupted a
    re-save of that step, its complete copy (the new one, else the old one) is put back under its name."""
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    folder = root / name
    if _complete(folder):
        return folder
    for candidate in (root / f".tmp-{name}", root / f".old-{name}"):
        if _complete(candidate):
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(candidate, folder)
            log.warning("checkpoint %s was being re-saved when the job stopped; using its complete copy", folder)
            return folder
    return None


def load_state(folder: Path) -> dict[str, Any]:
    """The orchestrator state of a checkpoint; restores the driver's RNG (loaded with weights_only=True)."""
    state = json.loads((folder / STATE_FILE).read_text())
    set_rng_state(torch.load(folder / RNG_FILE, weights_only=True))
    return state


def load_rollouts(folder: Path) -> dict[int, Any]:
    """The buffered rollouts a checkpoint holds ({} when none), loaded with weights_only=True."""
    path = folder / ROLLOUTS_FILE
    return torch.load(path, weights_only=True) if path.is_file() else {}


def _prune(root: Path, keep_last: int, step: int) -> None:
    """Keep the `keep_last` newest checkpoints up to `step` (the one just written always among them); steps after
    it belong to a timeline the run went back from, and go."""
    steps = sorted(
        (p for p in root.glob("step_*") if p.is_dir() and p.name.removeprefix("step_").isdigit()),
        key=lambda p: int(p.name.removeprefix("step_")),
    )
    later = [p for p in steps if int(p.name.removeprefix("step_")) > step]
    kept = [p for p in steps if p not in later]
    for old in later + kept[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)

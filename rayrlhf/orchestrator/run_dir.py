"""Whose `output_dir` is it: a run never writes over another run's files.

Checked before anything is written or any actor starts:
- without `--resume`, an `output_dir` that already holds a run (metrics.jsonl, checkpoints/, final/) is
  refused: its metrics would be replaced, checkpoint pruning would mix the two runs' steps, and a trainer
  rebuild could load the other run's checkpoint;
- with `--resume`, a complete checkpoint must be there; a resume that cannot resume changes nothing.
Both are bad input (exit 2) with a message naming what was looked for and what to do instead.
"""

from __future__ import annotations

from pathlib import Path

from rayrlhf.errors import InvalidInput
from rayrlhf.orchestrator.checkpoint import latest_checkpoint

RUN_FILES = ("metrics.jsonl", "checkpoints", "final")


def claim_output_dir(output_dir: str | Path, resume: bool) -> Path | None:
    """The checkpoint a resumed run continues from (None for a new run); raises InvalidInput when the folder
    cannot be used as asked."""
    out = Path(output_dir)
    if resume:
        folder = latest_checkpoint(out / "checkpoints")
        if folder is None:
            found = sorted(p.name for p in (out / "checkpoints").glob("*")) if (out / "checkpoints").is_dir() else []
            raise InvalidInput(
                f"--resume: no checkpoint to resume from under {out / 'checkpoints'} (looked for the file 'latest' naming a "
                f"complete step_N/ folder; found {found or 'nothing'}); nothing was changed. Run without --resume to "
                "start a new run, in an output_dir that holds none"
            )
        return folder
    used = [name for name in RUN_FILES if (out / name).exists()]
    if used:
        raise InvalidInput(
            f"output_dir {out} already holds a run ({', '.join(used)}); nothing was changed. Continue it with --resume, "
            "or start a new run in another output_dir (e.g. --set output_dir=...) or after removing this one"
        )
    return None

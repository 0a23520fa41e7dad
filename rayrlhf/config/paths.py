"""Relative paths in a job config, made absolute against the directory the job was started from.

Actors do not share the driver's working directory: on a cluster started with `ray start` they run where
the raylet was started, so a relative `reward.function: reward.py:fn` or `output_dir: runs/x` would name
another place (or nothing) inside the reward server or a trainer rank. The driver anchors every local path
once, before anything reads it; a value that names nothing on disk here (a hub id, `tiny:llama`, a dataset
name, `package.module:fn`) is left as written.
"""

from __future__ import annotations

from pathlib import Path

from rayrlhf.config.job import JobConfig


def _path(value: str | None, base: Path) -> str | None:
    """`value` absolute when it is a relative path to something that exists under `base`."""
    if not value or Path(value).is_absolute() or not (base / value).exists():
        return value
    return str((base / value).resolve())


def _spec(value: str | None, base: Path) -> str | None:
    """A user-code spec `path/to/file.py:Name` with its file made absolute (`package.module:Name` unchanged)."""
    if not value:
        return value
    target, sep, name = value.rpartition(":")
    if not sep or not target.endswith(".py"):
        return value
    return f"{_path(target, base)}:{name}"


def anchor_paths(cfg: JobConfig, base: str | Path | None = None) -> JobConfig:
    """Make `cfg`'s relative local paths absolute against `base` (default: the working directory), in place."""
    base = Path(base or Path.cwd())
    cfg.output_dir = str((base / cfg.output_dir).resolve()) if not Path(cfg.output_dir).is_absolute() else cfg.output_dir
    m = cfg.model
    m.policy, m.critic, m.reward, m.reference = (_path(v, base) for v in (m.policy, m.critic, m.reward, m.reference))
    d = cfg.data
    d.train, d.eval, d.pretrain = (_path(v, base) for v in (d.train, d.eval, d.pretrain))
    r = cfg.reward
    r.function, r.eval_function = _spec(r.function, base), _spec(r.eval_function, base)
    for part in r.functions or []:
        part.function = _spec(part.function, base)
    cfg.env.class_, cfg.env.tools = _spec(cfg.env.class_, base), _spec(cfg.env.tools, base)
    return cfg

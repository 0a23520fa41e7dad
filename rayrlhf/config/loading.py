"""Loading a job config: YAML file + `--set a.b=c` overrides -> validated JobConfig, with errors that
name the key, the file and the line."""

from __future__ import annotations

import difflib
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from rayrlhf.config.job import JobConfig
from rayrlhf.errors import InvalidInput

# ---------------------------------------------------------------------------------------------
# Loading: YAML file + `--set a.b=c` overrides -> validated JobConfig, with errors that name
# the key, the file and the line.
# ---------------------------------------------------------------------------------------------


class ConfigError(InvalidInput):
    """Invalid configuration; the message names the key, file and line and is shown without traceback."""


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML document to its 1-based line number."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*path, str(key_node.value))
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one `a.b=c` override; the value is read as YAML so `3`, `true`, `null`, `[1, 2]` get their types."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example --set algorithm.kl_coef=0.05")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc.problem})") from None
    return key.strip().split("."), value


def _apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        section = path[: i + 1]
        if part in _field_names(JobConfig, tuple(path[:i])) and not _is_section(JobConfig, tuple(section)):
            raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(section)} is a value, not a section")
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(section)} is not a mapping in the config file")
        node = child
    node[path[-1]] = value


def _section_model(model: type[BaseModel], path: tuple[str, ...]) -> type[BaseModel] | None:
    """The pydantic model of the section at `path`, or None when `path` is not a section."""
    for part in path:
        field = model.model_fields.get(part) or next((f for f in model.model_fields.values() if f.alias == part), None)
        annotation = getattr(field, "annotation", None)
        if get_origin(annotation) in (Union, UnionType):  # an optional section (`model.lora: LoraConfig | None`)
            annotation = next((a for a in get_args(annotation) if a is not type(None)), None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _is_section(model: type[BaseModel], path: tuple[str, ...]) -> bool:
    return _section_model(model, path) is not None


def _field_names(model: type[BaseModel], path: tuple[str, ...]) -> list[str]:
    """The valid keys of the section at `path`, to suggest a fix for a misspelt key."""
    section = _section_model(model, path)
    return [field.alias or name for name, field in section.model_fields.items()] if section else []


def _describe(error: dict[str, Any], source: str, lines: dict[tuple[str, ...], int], overridden: set[str]) -> str:
    loc = tuple(str(p) for p in error["loc"])
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc[-1], _field_names(JobConfig, loc[:-1]), n=1)
        why = "unknown key" + (f" (did you mean '{close[0]}'?)" if close else "")
    else:
        why = error["msg"].removeprefix("Value error, ")
    if not key:
        return why
    if key in overridden:
        where = "--set"
    elif loc in lines:
        where = f"{source}, line {lines[loc]}"
    else:
        where = source
    return f"{key}: {why} [{where}]"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read a job config from YAML (or defaults when `path` is None) and apply `--set` overrides."""
    source = str(path) if path is not None else "<defaults>"
    text = ""
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read the config file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text) if text else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    overridden = set()
    for item in overrides:
        keys, value = parse_override(item)
        _apply_override(data, keys, value)
        overridden.add(".".join(keys))
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        lines = _key_lines(text)
        messages = [_describe(e, source, lines, overridden) for e in exc.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(messages)) from None


def to_yaml(cfg: JobConfig) -> str:
    """The resolved config as YAML, as written to `output_dir/config.yaml` (it holds no secrets)."""
    return yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)

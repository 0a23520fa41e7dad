"""JSON schemas of tool functions, from their type hints and Google-style docstrings.

The schema is what a chat template shows the model (the OpenAI / Hugging Face "function" tool
format), and what a call's arguments are checked against before the tool runs:

    {"type": "function", "function": {"name": ..., "description": ...,
     "parameters": {"type": "object", "properties": {...}, "required": [...]}}}

Supported hints: str, int, float, bool, list[...], dict / dict[str, ...], X | None (Optional) and
Literal[...] (an enum). A parameter with a default is not required.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean"}
_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Returns|Return|Raises|Yields|Examples?|Notes?)\s*:\s*$")
_ARG_LINE = re.compile(r"^\s*\*{0,2}(\w+)\s*(\([^)]*\))?\s*:\s*(.*)$")


class ToolSchemaError(ValueError):
    """A tool function whose schema cannot be derived; the message names the function and parameter."""


def _type_schema(hint: Any, where: str) -> dict[str, Any]:
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is list or origin is list:
        return {"type": "array", "items": _type_schema(args[0], where)} if args else {"type": "array"}
    if hint is dict or origin is dict:
        if args and args[0] is not str:
            raise ToolSchemaError(f"{where}: dict keys must be str (JSON objects), got {args[0]!r}")
        return {"type": "object", "additionalProperties": _type_schema(args[1], where)} if args else {"type": "object"}
    if origin is Literal:
        kinds = {type(a) for a in args}
        if len(kinds) != 1 or next(iter(kinds)) not in _SCALARS:
            raise ToolSchemaError(f"{where}: Literal values must all be str, int, float or bool, got {args!r}")
        return {"type": _SCALARS[kinds.pop()], "enum": list(args)}
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise ToolSchemaError(f"{where}: only X | None unions are supported, got {hint!r}")
        schema = _type_schema(inner[0], where)
        if len(inner) < len(args):
            schema["type"] = [schema["type"], "null"]
        return schema
    raise ToolSchemaError(f"{where}: type {hint!r} is not supported (str, int, float, bool, list, dict, "
                          "X | None, Literal)")


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """The summary (text before the first section) and the Args: descriptions of a Google-style docstring."""
    lines = inspect.cleandoc(doc).splitlines() if doc else []
    summary: list[str] = []
    params: dict[str, str] = {}
    section = None
    current: str | None = None
    indent = 0
    for line in lines:
        header = _SECTION.match(line)
        if header:
            section, current = header.group(1), None
            continue
        if section is None:
            summary.append(line)
        elif section in ("Args", "Arguments", "Parameters") and line.strip():
            line_indent = len(line) - len(line.lstrip())
            match = _ARG_LINE.match(line)
            if match and (current is None or line_indent <= indent):
                current, indent = match.group(1), line_indent
                params[current] = match.group(3).strip()
            elif current is not None:  # a continuation line
                params[current] = f"{params[current]} {line.strip()}".strip()
    return " ".join(" ".join(summary).split()), params


def function_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """The "function" tool schema of one plain Python function."""
    name = getattr(fn, "__name__", None)
    if not callable(fn) or not name or name == "<lambda>":
        raise ToolSchemaError(f"{fn!r} is not a named function")
    try:
        hints = typing.get_type_hints(fn)
        signature = inspect.signature(fn)
    except (NameError, TypeError, ValueError) as exc:
        raise ToolSchemaError(f"tool {name!r}: cannot read its signature ({exc})") from exc
    description, arg_docs = _parse_docstring(inspect.getdoc(fn) or "")
    properties: dict[str, Any] = {}
    required: list[str] = []
    for param in signature.parameters.values():
        where = f"tool {name!r}, parameter {param.name!r}"
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise ToolSchemaError(f"{where}: tools take named arguments only (no *args, **kwargs or positional-only)")
        if param.name not in hints:
            raise ToolSchemaError(f"{where}: it has no type hint (the model needs one)")
        schema = _type_schema(hints[param.name], where)
        if param.name in arg_docs:
            schema["description"] = arg_docs[param.name]
        properties[param.name] = schema
        if param.default is param.empty:
            required.append(param.name)
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


def tool_schemas(functions: list[Callable[..., Any]]) -> list[dict[str, Any]]:
    """Schemas of a tool list, in order (pass them to the chat template as `tools=`); names must be unique."""
    schemas = [function_schema(fn) for fn in functions]
    names = [s["function"]["name"] for s in schemas]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ToolSchemaError(f"tool names must be unique: {duplicates} appear more than once")
    return schemas


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "array": (list,),
    "object": (dict,), "null": (type(None),),
}


def _matches(value: Any, schema: dict[str, Any]) -> bool:
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    ok = any(isinstance(value, _JSON_TYPES[k]) and not (k in ("integer", "number") and isinstance(value, bool))
             for k in kinds if k in _JSON_TYPES)
    if not ok:
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if isinstance(value, list) and "items" in schema:
        return all(_matches(v, schema["items"]) for v in value)
    if isinstance(value, dict) and "additionalProperties" in schema:
        return all(_matches(v, schema["additionalProperties"]) for v in value.values())
    return True


def check_arguments(schema: dict[str, Any], arguments: dict[str, Any]) -> str | None:
    """Why `arguments` do not fit the tool's schema (unknown, missing or mistyped), or None when they do."""
    params = schema["function"]["parameters"]
    name = schema["function"]["name"]
    unknown = sorted(set(arguments) - set(params["properties"]))
    if unknown:
        return f"tool {name!r} has no parameter(s) {unknown}; its parameters: {sorted(params['properties'])}"
    missing = [p for p in params["required"] if p not in arguments]
    if missing:
        return f"tool {name!r} is missing required argument(s) {missing}"
    for key, value in arguments.items():
        expected = params["properties"][key]
        if not _matches(value, expected):
            want = expected.get("enum") or expected["type"]
            return f"tool {name!r}: argument {key!r} must be {want}, got {value!r}"
    return None

"""Loading user code named in a config: `path/to/file.py:Name` or `package.module:Name`.

Reward functions (`reward.function`), environment classes (`env.class`) and tool lists
(`env.tools`) are all named this way; one loader gives them the same rules and errors that name
the config key and the spec, so a mistake exits 2 before any actor starts.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from rayrlhf.errors import InvalidInput


def load_object(spec: str, key: str, what: str = "attribute", placeholder: str = "name") -> Any:
    """Resolve `spec` to the object it names; InvalidInput naming `key` (e.g. 'env.class') when it cannot.

    `what` words the missing-name error ("has no class 'Foo'"), `placeholder` the format hint
    ("expected 'path/to/file.py:Foo'"). A file is executed as a module of its own, named after
    its resolved path so that every process gives it the same name.
    """
    target, sep, name = spec.rpartition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not target or not name:
        raise InvalidInput(
            f"{key} {spec!r}: expected 'path/to/file.py:{placeholder}' or 'package.module:{placeholder}'"
        )
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise InvalidInput(f"{key} {spec!r}: file {path} does not exist")
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
        module_name = f"rayrlhf_user_{path.stem}_{digest}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise InvalidInput(f"{key} {spec!r}: cannot load {path} as Python")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise InvalidInput(f"{key} {spec!r}: importing {path} failed: {exc!r}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise InvalidInput(f"{key} {spec!r}: cannot import module {target!r} ({exc})") from exc
        except Exception as exc:
            raise InvalidInput(f"{key} {spec!r}: importing module {target!r} failed: {exc!r}") from exc
    if not hasattr(module, name):
        raise InvalidInput(f"{key} {spec!r}: {target} has no {what} {name!r}")
    return getattr(module, name)

"""Load the operator's own code named on a command line (`--app`, `--evaluate`); never a plan's.

A spec is `module:function` (from the import path, the current directory first, as `python -m`
finds it) or `path/to/file.py:function`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


class UserCodeError(ValueError):
    """The named code cannot be loaded; the message names the flag, the spec and why."""


def load_callable(spec: str, flag: str) -> Callable[..., Any]:
    target, _, function = spec.rpartition(":")
    if not target or not function:
        raise UserCodeError(f"{flag} must be module:function or file.py:function, got {spec!r}")
    try:
        module = _load_file(target) if target.endswith(".py") else _import(target)
    except (ImportError, OSError, SyntaxError) as exc:
        raise UserCodeError(f"{flag} {spec}: cannot load {target}: {exc}") from exc
    fn = getattr(module, function, None)
    if not callable(fn):
        raise UserCodeError(f"{flag} {spec}: {target} has no function {function!r}")
    return fn  # type: ignore[no-any-return]


def _import(module_name: str) -> Any:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return importlib.import_module(module_name)


def _load_file(path: str) -> Any:
    file = Path(path).resolve()
    if not file.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    # The file's own folder is importable, so it can import its neighbours (a model module, say).
    if str(file.parent) not in sys.path:
        sys.path.insert(0, str(file.parent))
    spec = importlib.util.spec_from_file_location(file.stem, file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[file.stem] = module
    spec.loader.exec_module(module)
    return module

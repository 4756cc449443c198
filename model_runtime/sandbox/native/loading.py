"""Load an extension `build.py` built, by its path (never compiles: a missing build raises)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path
from types import ModuleType


def load_built(directory: Path, name: str) -> ModuleType:
    """`directory/name.so` as a module; ImportError where it is not built."""
    path = directory / f"{name}.so"
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    if spec is None or not path.exists():
        raise ImportError(f"{path} is not built (python -m model_runtime.sandbox.native.build)")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module

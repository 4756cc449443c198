"""The write guard as dispatcher kernels (native/write_guard.cpp), loaded once per process.

    guard = NativeWriteGuard(ServerStorage.of_modules([model._module]))
    with guard:                     # on the thread that runs the request
        ...

Same rules as the Python dispatch mode in `dispatch_guard.py`, enforced by C++ kernels on a
dispatch key that the guard puts in the request thread's include set:

* the key sits above autograd, so every dispatcher call the thread makes passes it: user code,
  nnsight's hooks, the model's forward, composite decompositions, calls made inside kernels and the
  backward pass (autograd carries the thread's dispatch keys to the backward);
* ops with nothing to check have a fallthrough kernel for the key, so they cost nothing; the
  ~1,500 ops that write an argument, update running statistics or allocate have a kernel that
  checks the written tensors' storage against the server's byte ranges, refuses before the kernel
  runs (`ModelTampering`), zeroes what allocations return, then redispatches below the key (a
  typed kernel for the ops a forward calls most, `native/typed_kernels.h`; one boxed kernel for
  the rest, same rule);
* the heavy op families and unbounded views (`work_bounds/`) have a kernel that prices them
  against the request's time left, and every kernel of the key ends a stopped request;
* an op registered later (a library imported after start-up) gets its kernel when the next guard
  is entered; until then it reaches the key's boxed fallback, which derives its rule from the
  schema at first call: slower, never unguarded.

The extension is built by `python -m model_runtime.sandbox.native.build` (the Makefile's install
step, the runtime image). The runtime never compiles: if the built module is missing or does not
load, `load()` says why and `dispatch_guard.WriteGuard` falls back to the Python mode (slower,
same rules), logging the reason once.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import threading
from types import ModuleType, TracebackType
from typing import Any

from model_runtime.sandbox.native.build import BUILD_DIR, NAME

log = logging.getLogger(__name__)

_lock = threading.Lock()
_loaded: ModuleType | None = None
_failure: str | None = None


def load() -> ModuleType | None:
    """The installed extension, or None (the reason is in `failure()`)."""
    global _loaded, _failure
    with _lock:
        if _loaded is None and _failure is None:
            try:
                _loaded = _import_and_install()
            except Exception as exc:  # missing build, ABI mismatch, registration refused
                _failure = f"{type(exc).__name__}: {exc}"
        return _loaded


def loaded() -> ModuleType | None:
    """The extension if it is already loaded (never loads it)."""
    return _loaded


def failure() -> str | None:
    load()
    return _failure


def _import_and_install() -> ModuleType:
    import torch  # noqa: F401 - the extension links against the loaded libtorch

    from model_runtime.sandbox import dispatch_guard, work_bounds
    from model_runtime.sandbox.errors import LimitExceeded, ModelTampering

    path = BUILD_DIR / f"{NAME}.so"
    if not path.exists():
        raise FileNotFoundError(f"{path} is not built (python -m model_runtime.sandbox.native.build)")
    loader = importlib.machinery.ExtensionFileLoader(NAME, str(path))
    spec = importlib.util.spec_from_file_location(NAME, path, loader=loader)
    if spec is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    installed = module.install(
        ModelTampering,
        sorted(dispatch_guard.UNINITIALISED_ALLOCATORS),
        sorted(dispatch_guard.GROWING),
        sorted(dispatch_guard.UNDECLARED_RUNNING_STATS),
        sorted(dispatch_guard.STATS_FLAGS),
        list(dispatch_guard.STATS_READ_ONLY),
        list(work_bounds.STOP_TYPES),
        LimitExceeded,
        work_bounds.COSTS,
    )
    work_bounds.install(module)
    log.debug("native write guard: %s", installed)
    return module


class NativeWriteGuard:
    """Enter on the thread that runs the request; re-entrant; the table is registered while any
    entry is open."""

    def __init__(self, storage: Any) -> None:
        native = load()
        if native is None:
            raise RuntimeError(f"the native write guard is unavailable: {_failure}")
        self._native = native
        self.storage = storage
        self._starts = [int(s) for s in storage.starts]
        self._ends = [int(e) for e in storage.ends]
        self._stack: list[tuple[int, bool]] = []

    def __enter__(self) -> NativeWriteGuard:
        self._native.refresh()  # kernels for ops registered since the last request
        token = self._native.add_table(self._starts, self._ends)
        self._stack.append((token, self._native.set_active(True)))
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        token, previous = self._stack.pop()
        self._native.set_active(previous)
        self._native.remove_table(token)

"""Layer 1: an unpickler that builds only what real nnsight 0.8.1 payloads contain.

A request blob is a cloudpickle stream, and an unrestricted unpickler runs any callable the
stream names (`os.system`, `builtins.exec`, ...). `SandboxUnpickler.find_class` resolves only an
exact `(module, qualname)` allowlist — the globals seen in real client payloads (trace, invokes,
helper functions, captured tensors, generate, sessions) — and swaps the dangerous ones for safe
stand-ins:

* `torch.storage._load_from_bytes` (a *second*, unrestricted `torch.load`) → a `weights_only`
  `torch.load`, which only rebuilds tensors and plain containers;
* `cloudpickle.subimport(name)` (import anything) → the capability proxy of an allowlisted module;
* `cloudpickle._builtin_type(name)` (e.g. `CodeType`) → only `SimpleNamespace` and `MethodType`;
* `nnsight…_load_function` (compile arbitrary source with the stock compiler) → the restricted
  compiler, or, for nnsight's own traceable methods shipped by value (`generate`), the server's
  installed function (the shipped source is ignored);
* `nnsight…_fill` (update any function's globals) → only for functions built by this unpickler.

The class takes `(file, persistent_objects)` like nnsight's `CustomCloudUnpickler`, so it also
works as the `unpickler=` hook of `RequestModel.deserialize` (then use `SandboxUnpickler.bind`
to attach the per-request guards).
"""

from __future__ import annotations

import io
import pickle
import types
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

from model_runtime.sandbox.compiling import Guards, restricted_function
from model_runtime.sandbox.errors import CapabilityDenied, CodeRejected, PayloadRejected

# Exactly the globals real payloads use (see research/nnsight-protocol.md §1.3 and
# tests/sandbox/test_unpickling.py, which records them from real client payloads).
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch", "Size"),
        ("torch", "float32"), ("torch", "float16"), ("torch", "bfloat16"), ("torch", "float64"),
        ("torch", "int64"), ("torch", "int32"), ("torch", "bool"), ("torch", "device"),
        ("nnsight.intervention.envoy", "Envoy"),
        ("nnsight.intervention.tracer", "InterleavingTracer"),
        ("nnsight.modeling.language", "LanguageModel"),
        ("nnsight.modeling.transformers", "GeneratorEnvoy"),
        ("nnsight.modeling.transformers", "TransformersModel"),
        ("nnsight.modeling.transformers", "TransformersModel._call"),
        ("nnsight.tracing.tracer", "Tracer"),
        ("nnsight.tracing.tracer", "Tracer.Info"),
        ("nnsight.tracing.util", "SerializedFrame"),
    }
)
# Replaced by a safe stand-in (see the module docstring).
SUBSTITUTED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("torch.storage", "_load_from_bytes"),
        ("cloudpickle.cloudpickle", "subimport"),
        ("cloudpickle.cloudpickle", "_builtin_type"),
        ("nnsight.intervention.serialization", "_load_function"),
        ("nnsight.intervention.serialization", "_fill"),
    }
)
_BUILTIN_TYPES = {"SimpleNamespace": types.SimpleNamespace, "MethodType": types.MethodType}

# nnsight methods decorated with @traceable ship the *undecorated* function by value (its
# source): (file suffix, name) → the server's own copy, looked up on the installed class.
_TRACEABLE_ORIGINS = {
    ("nnsight/modeling/transformers.py", "generate"): ("nnsight.modeling.transformers", "TransformersModel"),
    ("nnsight/modeling/transformers.py", "pipe"): ("nnsight.modeling.transformers", "TransformersModel"),
}

DEFAULT_MAX_DEPTH = 200


def _safe_load_from_bytes(data: bytes) -> Any:
    import torch

    if not isinstance(data, (bytes, bytearray)):
        raise PayloadRejected("a tensor storage must be bytes")
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as exc:
        raise PayloadRejected(f"nested tensor payload refused by the weights-only loader: {exc}") from None


class SandboxUnpickler(pickle.Unpickler):
    """Allowlisting unpickler; `persistent_load` resolves the server's live objects by id."""

    guards: ClassVar[Guards | None] = None  # set by `bind`; needed for helper functions

    def __init__(self, file: Any, persistent_objects: dict[str, Any] | None = None) -> None:
        super().__init__(file)
        self.persistent_objects = persistent_objects or {}
        self._built_functions: weakref.WeakSet[types.FunctionType] = weakref.WeakSet()
        self.seen: list[tuple[str, str]] = []

    @classmethod
    def bind(cls, guards: Guards) -> type[SandboxUnpickler]:
        """A subclass whose shipped functions run under `guards` (one per request)."""
        return type("BoundSandboxUnpickler", (cls,), {"guards": guards})

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, str) and pid in self.persistent_objects:
            return self.persistent_objects[pid]
        from nnsight.intervention.serialization import UnknownPersistentIdError

        raise UnknownPersistentIdError(pid)

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        self.seen.append(key)
        if key in SUBSTITUTED_GLOBALS:
            return self._substitute(name)
        if key not in ALLOWED_GLOBALS:
            raise PayloadRejected(f"the payload references {module}.{name}, which is not allowed")
        return super().find_class(module, name)

    def _substitute(self, name: str) -> Callable[..., Any]:
        if name == "_load_from_bytes":
            return _safe_load_from_bytes
        if name == "subimport":
            return self._subimport
        if name == "_builtin_type":
            return _builtin_type
        if name == "_load_function":
            return self._load_function
        return self._fill

    def _subimport(self, name: str) -> Any:
        guards = self._require_guards()
        try:
            return guards.caps.proxy(name)
        except CapabilityDenied:
            raise PayloadRejected(f"the payload imports module {name!r}, which is not allowed") from None

    def _load_function(
        self, source: str, name: str, defaults: Any, kwdefaults: Any, annotations: Any,
        origin_filename: str, origin_line: int,
    ) -> Any:
        if not all(isinstance(v, str) for v in (source, name, origin_filename)):
            raise PayloadRejected("a shipped function needs str source, name and filename")
        trusted = _trusted_traceable(origin_filename, name)
        if trusted is not None:
            return trusted
        guards = self._require_guards()
        try:
            func = restricted_function(
                source, name, origin_filename, int(origin_line), guards.namespace(), defaults
            )
        except CodeRejected as exc:
            raise CodeRejected(f"shipped function {name!r}: {exc}") from None
        if kwdefaults:
            func.__kwdefaults__ = dict(kwdefaults)
        self._built_functions.add(func)
        return func

    def _fill(self, func: Any, glbls: Any) -> None:
        if not isinstance(glbls, dict):
            raise PayloadRejected("function globals must be a dict")
        if not isinstance(func, types.FunctionType) or func not in self._built_functions:
            if _is_trusted_function(func):
                return  # the server's own function: its real globals stay untouched
            raise PayloadRejected("the payload tries to set globals of a function it did not ship")
        if any(not isinstance(k, str) or k.startswith("_") for k in glbls):
            raise PayloadRejected("shipped function globals may not define private names")
        func.__globals__.update(glbls)

    def _require_guards(self) -> Guards:
        if self.guards is None:
            raise PayloadRejected("this unpickler is not bound to a sandbox (use SandboxUnpickler.bind)")
        return self.guards


def _builtin_type(name: str) -> Any:
    if name not in _BUILTIN_TYPES:
        raise PayloadRejected(f"the payload asks for builtin type {name!r}, which is not allowed")
    return _BUILTIN_TYPES[name]


def _trusted_traceable(origin_filename: str, name: str) -> Any:
    import importlib

    normalized = origin_filename.replace("\\", "/")
    for (suffix, fn_name), (module, cls) in _TRACEABLE_ORIGINS.items():
        if fn_name == name and normalized.endswith(suffix):
            wrapper = getattr(getattr(importlib.import_module(module), cls), name)
            return getattr(wrapper, "__wrapped__", None)
    return None


def _is_trusted_function(func: Any) -> bool:
    import importlib

    for (_suffix, fn_name), (module, cls) in _TRACEABLE_ORIGINS.items():
        wrapper = getattr(getattr(importlib.import_module(module), cls), fn_name)
        if func is getattr(wrapper, "__wrapped__", None):
            return True
    return False


def loads(
    data: bytes, persistent_objects: dict[str, Any], guards: Guards,
) -> Any:
    """Unpickle a (decompressed) request payload under the allowlist."""
    return SandboxUnpickler.bind(guards)(io.BytesIO(data), persistent_objects).load()

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

Objects the payload did not create — the server's live modules (persistent ids) and the
allowlisted classes and functions — may not be *modified* by the stream: `BUILD` (which sets
`__dict__`/attributes), `SETITEM(S)`, `APPEND(S)` and `ADDITEMS` on them are refused (otherwise
`BUILD(<Module:lm_head>, {"_parameters": ...})` would swap the served weights, and a slot-state
`BUILD` on an allowlisted class would monkey-patch it). Only a few allowlisted functions may be
*called* (`REDUCE`); classes are only instantiated through `__new__` (`NEWOBJ`), never their
`__init__`. This needs the pure-Python unpickler's dispatch table (payloads are kilobytes).

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


# Globals the stream may call with REDUCE (everything else allowlisted is a class or a method
# reference that is only ever instantiated with NEWOBJ or bound with MethodType).
REDUCIBLE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch", "Size"),
        ("torch", "device"),
    }
)


class SandboxUnpickler(pickle._Unpickler):
    """Allowlisting unpickler; `persistent_load` resolves the server's live objects by id."""

    guards: ClassVar[Guards | None] = None  # set by `bind`; needed for helper functions
    dispatch: ClassVar[dict[int, Callable[..., None]]] = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(
        self, file: Any, persistent_objects: dict[str, Any] | None = None, guards: Guards | None = None
    ) -> None:
        super().__init__(file)
        if guards is not None:
            self.guards = guards  # per instance; `bind` makes a class for RequestModel.deserialize
        self._sandbox_file = file if isinstance(file, io.BytesIO) else io.BytesIO(file.read())
        self.persistent_objects = persistent_objects or {}
        self._built_functions: weakref.WeakSet[types.FunctionType] = weakref.WeakSet()
        self.seen: list[tuple[str, str]] = []
        # ids of objects that existed before this load (server objects, allowlisted globals):
        # the stream may reference them but never modify them.
        self._foreign: dict[int, Any] = {}
        self._reducible: dict[int, Any] = {}

    # -- opcodes that modify or call objects ---------------------------------------------------
    def _refuse_foreign(self, target: Any, opcode: str) -> None:
        if id(target) in self._foreign or isinstance(target, (type, types.ModuleType)):
            raise PayloadRejected(f"the payload tries to modify a server object ({opcode})")

    def _load_build(self) -> None:
        self._refuse_foreign(self.stack[-2], "BUILD")
        super().load_build()  # type: ignore[misc]

    def _load_setitem(self) -> None:
        self._refuse_foreign(self.stack[-3], "SETITEM")
        super().load_setitem()  # type: ignore[misc]

    def _load_setitems(self) -> None:
        self._refuse_foreign(self.metastack[-1][-1] if self.metastack else None, "SETITEMS")  # type: ignore[attr-defined]
        super().load_setitems()  # type: ignore[misc]

    def _load_append(self) -> None:
        self._refuse_foreign(self.stack[-2], "APPEND")
        super().load_append()  # type: ignore[misc]

    def _load_appends(self) -> None:
        self._refuse_foreign(self.metastack[-1][-1] if self.metastack else None, "APPENDS")  # type: ignore[attr-defined]
        super().load_appends()  # type: ignore[misc]

    def _load_additems(self) -> None:
        self._refuse_foreign(self.metastack[-1][-1] if self.metastack else None, "ADDITEMS")  # type: ignore[attr-defined]
        super().load_additems()  # type: ignore[misc]

    def _load_reduce(self) -> None:
        func = self.stack[-2]
        if id(func) not in self._reducible:
            raise PayloadRejected(f"the payload calls {getattr(func, '__qualname__', type(func).__name__)}, "
                                  "which only real payloads' helpers may do")
        super().load_reduce()  # type: ignore[misc]

    def load(self) -> Any:
        """`pickle._Unpickler.load` reading straight from the in-memory payload: protocol-4 frames
        are contiguous, so the pure-Python unframer (a third of the load time) is skipped."""
        file = self._sandbox_file
        self.read = file.read
        self.readinto = file.readinto
        self.readline = file.readline
        self.metastack = []
        self.stack: list[Any] = []
        self.append = self.stack.append
        self.proto = 0
        read, dispatch = self.read, self.dispatch
        try:
            while True:
                key = read(1)
                if not key:
                    raise EOFError
                dispatch[key[0]](self)
        except pickle._Stop as stop:  # type: ignore[attr-defined]
            return stop.value

    def _load_frame(self) -> None:
        self.read(8)  # the frame's length: only a read-ahead hint

    def _load_refused(self) -> None:
        raise PayloadRejected("the payload uses a pickle opcode real payloads never use (INST/OBJ)")

    for _op, _fn in (
        (pickle.BUILD, _load_build), (pickle.SETITEM, _load_setitem), (pickle.SETITEMS, _load_setitems),
        (pickle.APPEND, _load_append), (pickle.APPENDS, _load_appends), (pickle.ADDITEMS, _load_additems),
        (pickle.REDUCE, _load_reduce), (pickle.INST, _load_refused), (pickle.OBJ, _load_refused),
        (pickle.FRAME, _load_frame),
    ):
        dispatch[_op[0]] = _fn
    del _op, _fn

    @classmethod
    def bind(cls, guards: Guards) -> type[SandboxUnpickler]:
        """A subclass whose shipped functions run under `guards` (one per request)."""
        return type("BoundSandboxUnpickler", (cls,), {"guards": guards})

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, str) and pid in self.persistent_objects:
            obj = self.persistent_objects[pid]
            self._foreign[id(obj)] = obj
            return obj
        from nnsight.intervention.serialization import UnknownPersistentIdError

        raise UnknownPersistentIdError(pid)

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        self.seen.append(key)
        if key in SUBSTITUTED_GLOBALS:
            substitute = self._substitute(name)
            self._reducible[id(substitute)] = substitute
            return substitute
        if key not in ALLOWED_GLOBALS:
            raise PayloadRejected(f"the payload references {module}.{name}, which is not allowed")
        obj = super().find_class(module, name)
        self._foreign[id(obj)] = obj
        if key in REDUCIBLE_GLOBALS:
            self._reducible[id(obj)] = obj
        return obj

    def _substitute(self, name: str) -> Callable[..., Any]:
        if name == "_load_from_bytes":
            return _safe_load_from_bytes
        if name == "subimport":
            return self._subimport
        if name == "_builtin_type":
            return self._builtin_type
        if name == "_load_function":
            return self._load_function
        return self._fill

    def _builtin_type(self, name: str) -> Any:
        result = _builtin_type(name)
        self._reducible[id(result)] = result  # MethodType(func, obj) / SimpleNamespace(**kw)
        self._foreign[id(result)] = result
        return result

    def _subimport(self, name: str) -> Any:
        guards = self._require_guards()
        try:
            proxy = guards.caps.proxy(name)
            self._foreign[id(proxy)] = proxy
            return proxy
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
            self._foreign[id(trusted)] = trusted
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
    return SandboxUnpickler(io.BytesIO(data), persistent_objects, guards).load()

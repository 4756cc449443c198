"""Layer 3: what allowed modules user code may reach, as read-only proxies.

An import allowlist alone is not a capability boundary: `torch` alone can read and write any
file (`torch.load/save/from_file`), compile and load native code (`torch.utils.cpp_extension`,
`torch.ops.load_library`) and fetch code over the network (`torch.hub`). So each allowed module
reaches user code as a `ModuleProxy` that hides those entry points, refuses attribute writes
(no monkey-patching a module for the next request) and wraps submodules in proxies of their own.

Functions reached through a proxy are wrapped so a call cannot name a protected tensor (a
weight or buffer) as an in-place target (`out=`, `inplace=True`, a trailing-underscore
function such as `torch.nn.init.zeros_`).
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from model_runtime.replica.request_thread import current_stop
from model_runtime.sandbox.builtin_bounds import module_override
from model_runtime.sandbox.errors import CapabilityDenied
from model_runtime.settings import RuntimeSettings

# Names hidden in every proxied module: file, network, native code, (de)serialisation, process.
_COMMON_DENIED = frozenset(
    {
        "load", "loads", "save", "savez", "savez_compressed", "savetxt", "loadtxt", "genfromtxt", "fromregex",
        "fromfile", "tofile", "from_file", "memmap", "open", "system", "popen", "DataSource",
        "ctypeslib", "ctypes", "f2py", "distutils", "testing", "lib", "hub", "utils", "ops",
        "classes", "library", "jit", "compile", "package", "onnx", "export", "fx", "multiprocessing",
        "distributed", "backends", "storage", "serialization", "UntypedStorage", "TypedStorage",
        "ByteStorage", "FloatStorage", "set_num_threads", "set_num_interop_threads",
        "set_flush_denormal", "use_deterministic_algorithms", "set_float32_matmul_precision",
        "set_warn_always", "set_default_device", "set_printoptions", "seterr", "seterrcall",
        "set_string_function", "setbufsize", "overrides", "profiler", "mps", "xpu", "cuda",
        "attrgetter", "methodcaller", "from_dlpack", "to_dlpack", "import_module", "reload",
        "getLogger", "builtins", "sys", "os", "inspect", "importlib", "frombuffer", "set_rng_state",
        "set_default_tensor_type", "autocast_decrement_nesting", "set_default_dtype",
        "set_grad_enabled", "set_autocast_enabled", "set_anomaly_enabled", "seed", "Formatter", "Template",
    }
)

# Common names that are harmless in one module: `nnsight.save` marks a value to return.
_REALLOWED: Mapping[str, frozenset[str]] = {
    "nnsight": frozenset({"save"}),
    "json": frozenset({"loads", "dumps"}),
}

# Modules user code may import, with extra names hidden in each (on top of the common set).
DEFAULT_ALLOWED_MODULES: Mapping[str, frozenset[str]] = {
    # legacy constructors hand out uninitialised memory (see `_ZEROED` for torch.empty*)
    "torch": frozenset(
        {"FloatTensor", "DoubleTensor", "HalfTensor", "BFloat16Tensor", "ByteTensor", "CharTensor",
         "ShortTensor", "IntTensor", "LongTensor", "BoolTensor"}
    ),
    "torch.nn": frozenset({"Module"}),  # subclassing Module gives register/to/...; use functional
    "torch.nn.functional": frozenset(),
    "torch.nn.init": frozenset(),
    "torch.linalg": frozenset(),
    "torch.fft": frozenset(),
    "torch.special": frozenset(),
    "torch.distributions": frozenset({"Distribution"}),  # set_default_validate_args is global
    "torch.autograd": frozenset(
        {"graph", "set_detect_anomaly", "detect_anomaly", "forward_ad", "set_multithreading_enabled"}
    ),
    "einops": frozenset({"layers", "parsing", "_backends"}),
    "math": frozenset(),
    "cmath": frozenset(),
    "collections": frozenset({"abc"}),
    "itertools": frozenset(),
    # update_wrapper/wraps setattr (and update __dict__) on any object: past the write guard
    "functools": frozenset({"singledispatch", "singledispatchmethod", "update_wrapper", "wraps"}),
    # the in-place and item-setting functions would bypass the write guard
    "operator": frozenset(
        {"setitem", "delitem", "iadd", "iand", "iconcat", "ifloordiv", "ilshift", "imod", "imul",
         "imatmul", "ior", "ipow", "irshift", "isub", "itruediv", "ixor", "__setitem__", "__iadd__"}
    ),
    "statistics": frozenset(),
    "json": frozenset({"dump"}),
    # get_type_hints/ForwardRef eval() annotation strings with the stock compiler: an escape
    "typing": frozenset({"get_type_hints", "ForwardRef"}),
    # sleep/clocks only; a sleeping request is bounded by the timeout like any other
    "time": frozenset({"tzset", "clock_settime", "clock_settime_ns", "pthread_getcpuclockid"}),
    "nnsight": frozenset(
        {"CONFIG", "NNsight", "Envoy", "intervention", "modeling", "ndif", "schema", "tracing",
         "util", "register", "login", "mount", "install_backtrace_guard", "compare", "anyio",
         "transformers", "torch", "functools", "warnings", "status", "ndif_status", "whoami"}
    ),
}


# Modules refused with the reason and the alternative, not just "not available".
REFUSED_MODULES: Mapping[str, str] = {
    "numpy": (
        "numpy is not available in the sandbox: its kernels run as single C calls that the request's "
        "timeout can neither price nor stop; use the torch equivalents (torch.linalg, torch.fft, "
        "tensor methods), whose operations are bounded"
    ),
}

# Test-only: when a test fixture sets this variable on a replica, request code may import
# `model_runtime.sandbox.wedge_hook` (one C call no stop reaches), to prove that a wedged replica
# is replaced. Nothing the operator renders sets it.
WEDGE_HOOK_ENV = "NDIF_SANDBOX_TEST_WEDGE_HOOK"
WEDGE_HOOK_MODULE = "model_runtime.sandbox.wedge_hook"


def _default_allowed() -> dict[str, frozenset[str]]:
    allowed = dict(DEFAULT_ALLOWED_MODULES)
    if RuntimeSettings.from_env().sandbox_test_wedge_hook:
        allowed[WEDGE_HOOK_MODULE] = frozenset()
    return allowed


# Uninitialised memory can hold an earlier request's activations (the CPU heap and the CUDA
# caching allocator reuse freed blocks), so the `empty` family hands out zeroed tensors.
_ZEROED = {"empty": "zeros", "empty_like": "zeros_like"}


def _stoppable_sleep(seconds: float) -> None:
    """`time.sleep` for request code: a plain sleep is one C call that no stop can interrupt (the
    replica would count as wedged); this one waits on the request's stop signal instead."""
    current_stop().sleep(float(seconds))


def _zeroed_after(fn: Callable[..., Any]) -> Callable[..., Any]:
    def zeroed(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        return out.zero_() if hasattr(out, "zero_") else out

    return zeroed


def _is_protected_target(value: Any, is_protected: Callable[[Any], bool]) -> bool:
    if isinstance(value, (list, tuple)):
        return any(is_protected(v) for v in value)
    return is_protected(value)


@dataclass
class Capabilities:
    """The set of modules user code can reach, and how each is trimmed.

    `is_protected` answers "is this tensor a weight or buffer of the served model?"; the model
    guard supplies it so proxied functions can refuse to write into one.
    """

    allowed: Mapping[str, frozenset[str]] = field(default_factory=_default_allowed)
    is_protected: Callable[[Any], bool] = lambda _value: False
    _proxies: dict[str, ModuleProxy] = field(default_factory=dict)

    def proxy(self, name: str) -> ModuleProxy:
        """The proxy of allowed module `name` (imported with the sandbox off, cached)."""
        if name not in self.allowed:
            refusal = REFUSED_MODULES.get(name.split(".", 1)[0])
            if refusal is not None:
                raise CapabilityDenied(refusal)
            raise CapabilityDenied(f"module {name!r} is not available in the sandbox")
        if name not in self._proxies:
            self._proxies[name] = ModuleProxy(importlib.import_module(name), self)
        return self._proxies[name]

    def denied_in(self, module_name: str) -> frozenset[str]:
        common = _COMMON_DENIED - _REALLOWED.get(module_name, frozenset())
        return common | self.allowed.get(module_name, frozenset())

    def guarded_import(
        self,
        name: str,
        globals: Mapping[str, Any] | None = None,
        locals: Mapping[str, Any] | None = None,
        fromlist: tuple[str, ...] | list[str] | None = (),
        level: int = 0,
    ) -> Any:
        """`__import__` for sandboxed code: only allowlisted modules, always as proxies."""
        if level != 0:
            raise CapabilityDenied("relative imports are not available in the sandbox")
        if not isinstance(name, str):
            raise CapabilityDenied("import needs a module name")
        target = self.proxy(name)
        if fromlist:
            return target
        # `import a.b` binds `a`: every prefix has to be allowed too.
        if name == WEDGE_HOOK_MODULE:
            raise CapabilityDenied(f"use `from {WEDGE_HOOK_MODULE} import ...`")
        return self.proxy(name.split(".", 1)[0]) if "." in name else target

    def wrap_callable(self, fn: Callable[..., Any], name: str, module: str = "") -> Callable[..., Any]:
        """Wrap a module function so it cannot write into a protected tensor."""
        is_protected = self.is_protected
        trailing = name.endswith("_") and not name.endswith("__")

        def checked(*args: Any, **kwargs: Any) -> Any:
            if "out" in kwargs and _is_protected_target(kwargs["out"], is_protected):
                raise CapabilityDenied(f"{name}(out=...) would write into the model's weights")
            if (trailing or kwargs.get("inplace")) and any(is_protected(a) for a in args):
                raise CapabilityDenied(f"in-place {name}(...) on the model's weights is not allowed")
            result = fn(*args, **kwargs)
            if is_numpy(result):  # einops.asnumpy and the like: no ndarray reaches request code
                raise CapabilityDenied(f"{name}(...) returned a numpy value; {NUMPY_REFUSAL}")
            return result

        checked.__name__ = name
        checked.__doc__ = getattr(fn, "__doc__", None)
        return checked


NUMPY_REFUSAL = REFUSED_MODULES["numpy"]


def is_numpy(value: Any) -> bool:
    """Is `value` a numpy array, scalar, ufunc or array function, or one of their classes?"""
    if type(value) in _NEVER_NUMPY:  # the guards' hot path: tensors, methods, plain values
        return False
    if isinstance(value, _NUMPY_VALUES):
        return True
    if isinstance(value, type):
        return issubclass(value, _NUMPY_VALUES)
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):
        return str(getattr(value, "__module__", None) or "").split(".", 1)[0] == "numpy"
    return False


def _numpy_values() -> tuple[type, ...]:
    import numpy

    return (numpy.ndarray, numpy.generic, numpy.ufunc, numpy.dtype, type(numpy.dot))


_NUMPY_VALUES = _numpy_values()

def _never_numpy() -> frozenset[type]:
    import torch

    return frozenset({torch.Tensor, torch.nn.Parameter, types.MethodType, types.BuiltinMethodType,
                      type(None), bool, int, float, complex, str, bytes, list, tuple, dict, set, slice})


_NEVER_NUMPY = _never_numpy()

_PROXY_OWN = frozenset({"__class__", "__dir__", "__repr__", "__reduce__", "__reduce_ex__", "__setattr__",
                        "__delattr__"})


class ModuleProxy:
    """A read-only view of one allowed module, minus its dangerous names."""

    __slots__ = ("_sandbox_cache", "_sandbox_caps", "_sandbox_module")

    def __init__(self, module: types.ModuleType, caps: Capabilities) -> None:
        object.__setattr__(self, "_sandbox_module", module)
        object.__setattr__(self, "_sandbox_caps", caps)
        object.__setattr__(self, "_sandbox_cache", {})

    def __getattribute__(self, name: str) -> Any:
        # __getattribute__, not __getattr__: names every object has (nnsight mounts `save` on
        # `object`) must resolve in the proxied module, not on the proxy.
        if name in _PROXY_OWN:
            return object.__getattribute__(self, name)
        cache: dict[str, Any] = object.__getattribute__(self, "_sandbox_cache")
        if name in cache:
            return cache[name]
        module: types.ModuleType = object.__getattribute__(self, "_sandbox_module")
        caps: Capabilities = object.__getattribute__(self, "_sandbox_caps")
        if name.startswith("_") or name in caps.denied_in(module.__name__):
            raise CapabilityDenied(f"{module.__name__}.{name} is not available in the sandbox")
        override = module_override(module.__name__, name)
        if override is not None:
            value = override  # bounded C work: itertools' iterators stop-checked, big-int math bounded
        elif module.__name__ == "torch" and name in _ZEROED:
            value = getattr(module, _ZEROED[name])
        elif module.__name__ == "torch" and name == "empty_strided":
            value = _zeroed_after(module.empty_strided)
        elif module.__name__ == "time" and name == "sleep":
            value = _stoppable_sleep
        else:
            value = getattr(module, name)
        if isinstance(value, types.ModuleType):
            value = caps.proxy(value.__name__)  # raises unless that submodule is allowed too
        elif isinstance(value, (types.FunctionType, types.BuiltinFunctionType)) or (
            callable(value) and not isinstance(value, type) and type(value).__module__ != "torch"
        ):
            value = caps.wrap_callable(value, name, module.__name__)
        cache[name] = value
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        raise CapabilityDenied("modules are read-only in the sandbox")

    def __delattr__(self, name: str) -> None:
        raise CapabilityDenied("modules are read-only in the sandbox")

    def __dir__(self) -> list[str]:
        module: types.ModuleType = object.__getattribute__(self, "_sandbox_module")
        caps: Capabilities = object.__getattribute__(self, "_sandbox_caps")
        denied = caps.denied_in(module.__name__)
        return sorted(n for n in dir(module) if not n.startswith("_") and n not in denied)

    def __repr__(self) -> str:
        module: types.ModuleType = object.__getattribute__(self, "_sandbox_module")
        return f"<sandboxed module {module.__name__!r}>"

    def __reduce__(self) -> Any:
        raise CapabilityDenied("modules cannot be pickled out of the sandbox")

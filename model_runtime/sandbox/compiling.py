"""Layer 2: the trace body and shipped helper functions compile through RestrictedPython.

RestrictedPython rewrites the AST so every attribute read, item read, iteration, unpacking,
attribute/item write, augmented assignment and `print` goes through a guard function
(`_getattr_`, `_getitem_`, `_getiter_`, `_write_`, `_inplacevar_`, ...), and it rejects at
compile time any name or attribute starting with `_` (no `__class__`, `__globals__`,
`__subclasses__`, `__builtins__`), generator/frame attributes and `except*`. NDIF's guards
were inert because the code was compiled with the stock `compile()`; here *all* user code is
compiled by `restricted_compile`:

* the trace body (the executor compiles it instead of `RequestModel.deserialize`);
* every inner `with` block nnsight captures at run time (`tracer.invoke`, `tracer.iter`,
  `backward`, the inner traces of a session): `install_compile_hook()` wraps
  `nnsight.tracing.tracer.Tracer.compile` so that, while a sandboxed request runs on this
  thread, it compiles restricted too;
* helper functions shipped by value (the unpickler routes `_load_function` here).

Our policy adds to RestrictedPython's: a bare `except:` is rewritten to `except Exception:` so
the timeout (a BaseException) cannot be swallowed, and `global`/`nonlocal` are refused.
"""

from __future__ import annotations

import ast
import builtins
import copy
import functools
import operator
import threading
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from RestrictedPython.compile import compile_restricted
from RestrictedPython.Guards import guarded_iter_unpack_sequence, guarded_unpack_sequence
from RestrictedPython.transformer import INSPECT_ATTRIBUTES, RestrictingNodeTransformer

from model_runtime.sandbox import sources
from model_runtime.sandbox.capabilities import Capabilities, ModuleProxy
from model_runtime.sandbox.errors import CapabilityDenied, CodeRejected, ModelTampering
from model_runtime.sandbox.model_guard import MODULE_MUTATORS, TENSOR_ALIASING

# Attribute names refused on every object: file/network/code-loading methods reachable from
# objects user code legitimately holds (tokenizer, config, numpy arrays, hub mixins).
DENIED_ATTRIBUTES = frozenset(
    INSPECT_ATTRIBUTES
    | {
        "format", "format_map", "save_pretrained", "save_vocabulary", "push_to_hub",
        "from_pretrained", "to_json_file", "to_yaml_file", "tofile", "dump", "dumps", "ctypes",
        "register_for_auto_class", "save_model", "from_file", "mro", "f_lasti", "f_lineno",
        "get_config_dict", "from_json_file", "from_config", "cached_file", "snapshot_download",
        # uninitialised memory (an earlier request's data): use zeros/new_zeros
        "new_empty", "new_empty_strided", "resize_", "resize_as_",
        # process-wide switches reachable as class attributes
        "set_default_validate_args",
        "gi_running", "cr_running", "co_consts", "co_names", "tb_lasti", "tb_lineno",
    }
)

# Methods that mutate shared tokenizer/config/generation-config objects (the next request would
# see the change); refused on objects from these libraries.
_SHARED_OBJECT_MUTATORS = frozenset(
    {
        "add_tokens", "add_special_tokens", "train_new_from_iterator", "enable_padding",
        "enable_truncation", "no_padding", "no_truncation", "set_truncation_and_padding",
        "update", "from_dict", "pop", "popitem", "clear", "setdefault", "register_pipeline",
        "train", "train_from_iterator",
        "set_format", "add_adapter", "load_adapter",
    }
)

# Interpreter internals: with a code object and `tracer.execute` (or a frame's globals) any
# restriction is moot, so they are neither handed out nor inspected.
_INTERPRETER_TYPES = (types.CodeType, types.FrameType, types.TracebackType, types.GeneratorType,
                      types.CoroutineType, types.AsyncGeneratorType, types.CellType)

# Tracer methods and state that run or rewrite code (`execute(code)`, `compile`, the captured
# frame) or point at server objects; user code needs `invoke`, `iter`, `result`, `stop`, ...
_TRACER_INTERNALS = frozenset(
    {"execute", "capture", "compile", "parse", "build", "source", "info", "backend", "fn", "args",
     "kwargs", "envoy", "batcher", "node", "push", "interleaver", "mediators"}
)

# Envoy methods that persist edits or re-point the envoy tree at other modules.
_ENVOY_INTERNALS = frozenset({"edit", "clear_edits", "export_edits", "import_edits", "interleaver", "update"})

# The nn.Module methods user code may call (read-only, or running the module).
SAFE_MODULE_METHODS = frozenset(
    {
        "forward", "parameters", "named_parameters", "buffers", "named_buffers", "children",
        "named_children", "modules", "named_modules", "state_dict", "get_submodule",
        "get_parameter", "get_buffer", "extra_repr", "get_input_embeddings",
        "get_output_embeddings", "num_parameters", "get_extended_attention_mask", "can_generate",
        "get_decoder", "get_encoder", "generate", "get_position_embeddings",
    }
)

# Builtins a sandboxed program may not have, present as stubs so the error says why.
_DENIED_BUILTINS = (
    "open", "exec", "eval", "compile", "globals", "locals", "vars", "dir", "type", "object",
    "breakpoint", "input", "help", "memoryview", "setattr", "delattr", "super", "classmethod",
    "staticmethod", "property", "exit", "quit", "copyright", "credits", "license", "aiter", "anext",
    "BaseException", "SystemExit", "KeyboardInterrupt", "GeneratorExit",
)

# Object types whose `save`/`load` methods touch the filesystem (tokenizers' Rust Tokenizer,
# numpy, safetensors); `save` stays available elsewhere because it is nnsight's `.save()`.
_FILE_METHOD_MODULES = ("tokenizers", "transformers", "numpy", "safetensors", "huggingface_hub")

_SAFE_BUILTIN_NAMES = (
    "abs", "all", "any", "ascii", "bin", "bool", "bytes", "callable", "chr", "complex", "dict",
    "divmod", "enumerate", "filter", "float", "frozenset", "hash", "hex", "id", "int", "isinstance",
    "issubclass", "len", "list", "map", "max", "min", "next", "oct", "ord", "pow", "range", "repr",
    "reversed", "round", "set", "slice", "sorted", "str", "sum", "tuple", "zip", "True", "False",
    "None", "Ellipsis", "NotImplemented", "ArithmeticError", "AssertionError", "AttributeError",
    "Exception", "IndexError", "KeyError", "LookupError", "NameError", "NotImplementedError",
    "OverflowError", "RuntimeError", "StopIteration", "TypeError", "ValueError", "Warning",
    "ZeroDivisionError", "UserWarning", "DeprecationWarning", "ImportError", "IOError", "OSError",
)


class SandboxPolicy(RestrictingNodeTransformer):  # type: ignore[misc]  # RestrictedPython is untyped
    """RestrictedPython's policy plus the rules the timeout and shared state need."""

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> ast.AST:
        # A bare `except:` would catch the injected timeout; narrow it to `Exception`.
        if node.type is None:
            node.type = ast.copy_location(ast.Name(id="Exception", ctx=ast.Load()), node)
        result: ast.AST = super().visit_ExceptHandler(node)
        return result

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        # `h[:, -1, :] += v` (the tutorials' steering line) and `acc.total += x` on an object of
        # the request's own class: RestrictedPython refuses both; here they become one guard call
        # that reads, applies the in-place operator and writes back, each step guarded.
        target = node.target
        if not isinstance(target, (ast.Subscript, ast.Attribute)):
            result: ast.AST = super().visit_AugAssign(node)
            return result
        op = _AUGMENTED_OPS[type(node.op)]
        obj: ast.expr = self.visit(target.value)
        value: ast.expr = self.visit(node.value)
        if isinstance(target, ast.Subscript):
            key: ast.expr = self.visit(_slice_as_expression(target.slice))
            guard, args = "_inplace_item_", [obj, key]
        else:
            self.check_name(node, target.attr)  # the same rule as a plain attribute access
            guard, args = "_inplace_attr_", [obj, ast.Constant(target.attr)]
        call = ast.Expr(ast.Call(ast.Name(guard, ast.Load()), [*args, ast.Constant(op), value], []))
        for made in ast.walk(call):
            if not hasattr(made, "lineno") and isinstance(made, (ast.expr, ast.stmt)):
                ast.copy_location(made, node)
        return call

    def visit_Try(self, node: ast.Try) -> ast.AST:
        _refuse_flow_out_of_finally(self, node.finalbody)
        result: ast.AST = self.node_contents_visit(node)
        return result

    def visit_Global(self, node: ast.Global) -> ast.AST:
        self.error(node, "global statements are not allowed in the sandbox")
        return node

    def visit_Nonlocal(self, node: ast.Nonlocal) -> ast.AST:
        self.error(node, "nonlocal statements are not allowed in the sandbox")
        return node


_AUGMENTED_OPS: dict[type[ast.operator], str] = {
    ast.Add: "+=", ast.Sub: "-=", ast.Mult: "*=", ast.Div: "/=", ast.FloorDiv: "//=", ast.Mod: "%=",
    ast.Pow: "**=", ast.MatMult: "@=", ast.LShift: "<<=", ast.RShift: ">>=", ast.BitAnd: "&=",
    ast.BitOr: "|=", ast.BitXor: "^=",
}


def _slice_as_expression(node: ast.expr) -> ast.expr:
    """A subscript's key as an ordinary expression: `a:b:c` → `slice(a, b, c)`, in tuples too."""
    if isinstance(node, ast.Slice):
        parts = [part if part is not None else ast.Constant(None) for part in (node.lower, node.upper, node.step)]
        return ast.copy_location(ast.Call(ast.Name("slice", ast.Load()), parts, []), node)
    if isinstance(node, ast.Tuple):
        return ast.copy_location(ast.Tuple([_slice_as_expression(e) for e in node.elts], ast.Load()), node)
    return node


def _refuse_flow_out_of_finally(policy: RestrictingNodeTransformer, body: list[ast.stmt]) -> None:
    """`continue`/`break`/`return` in a `finally` would discard the exception in flight, which
    may be the request's timeout: a `while True: try: ... finally: continue` loop would absorb
    every stop. Loops and functions nested inside the `finally` are their own scope for these."""
    pending: list[ast.AST] = list(body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Continue, ast.Break, ast.Return)):
            policy.error(node, f"'{type(node).__name__.lower()}' inside 'finally' is not allowed in the sandbox "
                               "(it would swallow the request's stop); move it after the try statement")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
            # break/continue inside a nested loop leave that loop only; a return still leaves.
            pending.extend(n for n in ast.walk(node) if isinstance(n, ast.Return))
            continue
        pending.extend(ast.iter_child_nodes(node))


def restricted_compile(source: str | ast.Module, filename: str, name: str | None = None) -> types.CodeType:
    """Compile `source` (text or a module AST, which is not modified) under the sandbox policy.

    Text sources are memoised: clients send the same block over and over (a trace in a loop), and
    a code object is immutable, so sharing it across requests is safe.
    """
    if isinstance(source, str):
        return _compile_text(source, filename, name)
    return _compile_tree(copy.deepcopy(source), filename, name)


def _compile_text(source: str, filename: str, name: str | None) -> types.CodeType:
    # Each request's source has its own server-made file name (sources.py), so the memo is keyed
    # by text alone and the file name is put into the (immutable) code objects afterwards.
    return _with_filename(_compile_text_memo(source, name), filename)


@functools.lru_cache(maxsize=512)
def _compile_text_memo(source: str, name: str | None) -> types.CodeType:
    return _compile_tree(source, "<request>", name)


def _with_filename(code: types.CodeType, filename: str) -> types.CodeType:
    if code.co_filename == filename:
        return code
    consts = tuple(_with_filename(c, filename) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)


def _compile_tree(tree: str | ast.Module, filename: str, name: str | None) -> types.CodeType:
    try:
        # RestrictedPython warns (SyntaxWarning) about its own `printed` bookkeeping when a block
        # prints; the request's stderr is streamed to the user as LOG, so keep that noise out.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            code: types.CodeType = compile_restricted(tree, filename=filename, mode="exec", policy=SandboxPolicy)
    except SyntaxError as exc:
        raise CodeRejected(str(exc)) from None
    return code.replace(co_name=name) if name else code


# --------------------------------------------------------------------------------------------
# Guards: the functions the rewritten code calls. Built per request around one `Guards` object.


@dataclass
class GuardCounters:
    """How often each guard ran; tests use it to prove the guards are really called."""

    getattr: int = 0
    getitem: int = 0
    write: int = 0
    iter: int = 0
    inplace: int = 0
    imports: int = 0


class _EnvoyWriter:
    """What `_write_(envoy)` returns: only the intervention slots may be assigned."""

    __slots__ = ("_target",)
    WRITABLE = frozenset({"output", "input", "inputs", "grad"})

    def __init__(self, target: Any) -> None:
        object.__setattr__(self, "_target", target)

    def __setattr__(self, name: str, value: Any) -> None:
        import torch

        if name not in self.WRITABLE:
            raise ModelTampering(f"assigning .{name} on a model module is not allowed")
        if isinstance(value, torch.nn.Module):
            # Envoy.__setattr__ would `add_module` it to the served model, for every later request.
            raise ModelTampering("assigning a module into the model is not allowed")
        setattr(object.__getattribute__(self, "_target"), name, value)

    def __setitem__(self, key: Any, value: Any) -> None:
        object.__getattribute__(self, "_target")[key] = value


class _TensorWriter:
    """What `_write_(tensor)` returns: items may be assigned; of attributes only `grad` and
    `requires_grad` (an attribute set on a tensor the server keeps would travel into later
    requests)."""

    __slots__ = ("_target",)
    WRITABLE = frozenset({"grad", "requires_grad"})

    def __init__(self, target: Any) -> None:
        object.__setattr__(self, "_target", target)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self.WRITABLE:
            raise CapabilityDenied(f"setting .{name} on a tensor is not allowed; keep the value in a variable or dict")
        setattr(object.__getattribute__(self, "_target"), name, value)

    def __setitem__(self, key: Any, value: Any) -> None:
        object.__getattribute__(self, "_target")[key] = value


@dataclass
class Guards:
    """The guard functions for one request, closed over its capabilities and model guard."""

    caps: Capabilities
    is_protected: Callable[[Any], bool]
    on_print: Callable[[str], None] = lambda _text: None
    #: Whether an object belongs to the served model's state (provenance.ServerState.owns).
    server_owned: Callable[[Any], bool] = lambda _obj: False
    #: Bytes of printed output a request may send back as LOG lines (the rest is dropped).
    max_print_bytes: int = 1024 * 1024
    printed_bytes: int = 0
    counters: GuardCounters = field(default_factory=GuardCounters)

    # -- attribute reads ---------------------------------------------------------------------
    def getattr_(self, obj: Any, name: str, *default: Any) -> Any:
        self.counters.getattr += 1
        if not isinstance(name, str):
            raise CapabilityDenied("attribute names must be strings")
        if name.startswith("_") or name in DENIED_ATTRIBUTES:
            raise CapabilityDenied(f"attribute {name!r} is not available in the sandbox")
        if isinstance(obj, ModuleProxy):
            return getattr(obj, name, *default)
        unbound = isinstance(obj, type) and any(obj is t for t in _CONTAINER_TYPES)
        if name in _CONTAINER_MUTATORS and (unbound or self.server_owned(obj)):
            # `model.kwargs.update(...)`, or `dict.update(server_dict, ...)`: a method call is a
            # write the write guard never sees.
            raise ModelTampering(f".{name}() would change the served model's state, which is read-only to "
                                 "requests; copy the container first (list(x), dict(x))"
                                 if not unbound else
                                 f"unbound {obj.__name__}.{name} is not available; call it on the object")
        if isinstance(obj, types.ModuleType):
            raise CapabilityDenied("raw modules are not available in the sandbox")
        if isinstance(obj, _INTERPRETER_TYPES):
            raise CapabilityDenied(f"attributes of {type(obj).__name__} objects are not available in the sandbox")
        self._check_object_attr(obj, name)
        value = getattr(obj, name, *default)
        if isinstance(value, types.ModuleType):
            # A module reached through an object (`np.core`, a function's module): only
            # allowlisted ones, and only as proxies.
            return self.caps.proxy(value.__name__)
        if isinstance(value, _INTERPRETER_TYPES):
            raise CapabilityDenied(f"{type(value).__name__} objects are not available in the sandbox")
        if isinstance(value, types.MethodType) and _is_module(value.__self__) and name not in SAFE_MODULE_METHODS:
            # Methods of the served modules (directly or through an envoy's fall-through) are
            # allowlisted: `reset_parameters`, `initialize_weights`, `prune_heads`, ... rewrite
            # weights in place, and the list of such methods is open-ended.
            raise ModelTampering(f".{name}() on a model module is not allowed")
        if isinstance(value, (dict, list, set)) and _library_of(obj) in ("transformers", "tokenizers"):
            # Containers owned by the shared tokenizer/config: hand out a copy, so mutating it
            # cannot change what the next request sees.
            return copy.deepcopy(value)
        return value

    def _check_object_attr(self, obj: Any, name: str) -> None:
        import torch

        owner = obj if isinstance(obj, type) else type(obj)
        library = owner.__module__.split(".")[0]
        if name in ("save", "load") and library in _FILE_METHOD_MODULES:
            raise CapabilityDenied(f"{owner.__name__}.{name} touches the filesystem; not allowed")
        if name in _SHARED_OBJECT_MUTATORS and library in ("transformers", "tokenizers", "nnsight"):
            raise CapabilityDenied(f"{owner.__name__}.{name} would change shared server state; not allowed")
        if issubclass(owner, torch.nn.Module) or _is_envoy(obj):
            if name in ("edit", "clear_edits") and not isinstance(obj, type):
                raise ModelTampering(f".{name}() is not available remotely: an edit would persist in the served "
                                     "model for every later user; assign the intervention in the trace body "
                                     "instead (e.g. `model.layer.output[:] = ...`)")
            if name in MODULE_MUTATORS or (name in _ENVOY_INTERNALS and not isinstance(obj, type)):
                raise ModelTampering(f".{name}() on a model module is not allowed")
            if isinstance(obj, type) and name not in SAFE_MODULE_METHODS and callable(getattr(obj, name, None)):
                # `torch.nn.Linear.reset_parameters(<served module>)`: the unbound spelling of a
                # method the instance check refuses.
                raise ModelTampering(f"{obj.__name__}.{name} is not available in the sandbox")
            return
        if _is_tracer(obj) and name in _TRACER_INTERNALS:
            raise CapabilityDenied(f"tracer.{name} is internal to the server")
        if issubclass(owner, torch.Tensor):
            mutating = name in TENSOR_ALIASING or (name.endswith("_") and not name.endswith("__"))
            if mutating and (isinstance(obj, type) or self.is_protected(obj)):
                raise ModelTampering(f".{name} on the model's weights is not allowed")

    def hasattr_(self, obj: Any, name: str) -> bool:
        try:
            self.getattr_(obj, name)
        except (AttributeError, CapabilityDenied, ModelTampering):
            return False
        return True

    # -- item reads, iteration ---------------------------------------------------------------
    def getitem_(self, obj: Any, index: Any) -> Any:
        self.counters.getitem += 1
        if isinstance(obj, (types.ModuleType, ModuleProxy)):
            raise CapabilityDenied("modules are not subscriptable in the sandbox")
        return obj[index]

    def getiter_(self, obj: Any) -> Any:
        self.counters.iter += 1
        return iter(obj)

    # -- writes ------------------------------------------------------------------------------
    def write_(self, obj: Any) -> Any:
        import torch

        self.counters.write += 1
        if isinstance(obj, (types.ModuleType, ModuleProxy, type, types.FunctionType,
                            types.BuiltinFunctionType, types.MethodType)):
            raise CapabilityDenied(f"cannot assign attributes or items of {type(obj).__name__}")
        if isinstance(obj, torch.nn.Module):
            raise ModelTampering("assigning into a model module is not allowed")
        if self.is_protected(obj):
            raise ModelTampering("writing into the model's weights is not allowed")
        if _is_envoy(obj):
            return _EnvoyWriter(obj)
        if self.server_owned(obj):
            raise ModelTampering(f"this {type(obj).__name__} belongs to the served model's state and is read-only "
                                 "to requests; copy it first (list(x), dict(x)) and change the copy")
        if isinstance(obj, torch.Tensor):
            return _TensorWriter(obj)
        if isinstance(obj, (list, dict, set, bytearray)) or type(obj).__module__ == "sandbox":
            return obj
        # Anything else is shared server state (tokenizer, config, nnsight internals).
        raise CapabilityDenied(f"objects of type {type(obj).__name__} are read-only in the sandbox")

    def inplacevar_(self, op: str, target: Any, value: Any) -> Any:
        self.counters.inplace += 1
        if self.is_protected(target):
            raise ModelTampering(f"in-place {op} on the model's weights is not allowed")
        fn = _INPLACE_OPS.get(op)
        if fn is None:
            raise CodeRejected(f"operator {op} is not supported")
        return fn(target, value)

    def inplace_item_(self, obj: Any, key: Any, op: str, value: Any) -> None:
        """`obj[key] op= value`: read, apply the operator in place, write back (all guarded)."""
        target = self.write_(obj)
        target[key] = self.inplacevar_(op, self.getitem_(obj, key), value)

    def inplace_attr_(self, obj: Any, name: str, op: str, value: Any) -> None:
        """`obj.name op= value`."""
        target = self.write_(obj)
        setattr(target, name, self.inplacevar_(op, self.getattr_(obj, name), value))

    def apply_(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    def import_(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self.counters.imports += 1
        return self.caps.guarded_import(name, *args, **kwargs)

    # -- namespace ---------------------------------------------------------------------------
    def builtins(self) -> dict[str, Any]:
        table = dict(_STATIC_BUILTINS)
        table.update(
            __import__=self.import_,
            getattr=self.getattr_,
            hasattr=self.hasattr_,
            iter=self.getiter_,
            print=self._print_function,
        )
        return table

    def _print_function(self, *args: Any, sep: str = " ", end: str = "\n", **_kwargs: Any) -> None:
        if self.printed_bytes > self.max_print_bytes:
            return
        text = str(sep).join(str(a) for a in args) + (str(end) if end != "\n" else "")
        self.printed_bytes += len(text)
        if self.printed_bytes > self.max_print_bytes:
            text = f"[sandbox] output truncated after {self.max_print_bytes:,} bytes"
        self.on_print(text)

    def namespace(self) -> dict[str, Any]:
        """The guard names RestrictedPython's rewritten code looks up, plus safe builtins.

        A fresh dict each call (it becomes a block's or a function's globals) around one shared
        builtins table per request.
        """
        return dict(self._namespace)

    def release(self) -> None:
        """Drop the request's namespace once the request is over.

        The namespace holds bound methods of this object, so the two form a reference cycle that
        would keep every object the request built alive until the cyclic collector runs (about
        0.3 ms per request for the young-generation pass). Breaking it here lets reference
        counting free them when the request's tracer goes.
        """
        self.__dict__.pop("_namespace", None)

    @functools.cached_property
    def _namespace(self) -> dict[str, Any]:
        return {
            "__builtins__": self.builtins(),
            "_getattr_": self.getattr_,
            "_getitem_": self.getitem_,
            "_getiter_": self.getiter_,
            "_write_": self.write_,
            "_inplacevar_": self.inplacevar_,
            "_inplace_item_": self.inplace_item_,
            "_inplace_attr_": self.inplace_attr_,
            "_apply_": self.apply_,
            "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
            "_unpack_sequence_": guarded_unpack_sequence,
            "_print_": functools.partial(_Print, self._print_function),
            "__metaclass__": type,
            "__name__": "sandbox",
        }


class _Print:
    """RestrictedPython rewrites `print(...)` to `_print_(_getattr_)._call_print(...)`."""

    __slots__ = ("_sink",)

    def __init__(self, sink: Callable[..., None], _getattr: Any = None) -> None:
        self._sink = sink

    def _call_print(self, *args: Any, **kwargs: Any) -> None:
        self._sink(*args, **kwargs)


def _denied_builtin(name: str) -> Callable[..., Any]:
    def denied(*_args: Any, **_kwargs: Any) -> Any:
        raise CapabilityDenied(f"{name}() is not available in the sandbox")

    denied.__name__ = name
    return denied


def _guarded_build_class(func: Any, name: str, *bases: Any, **kwargs: Any) -> Any:
    # Classes may only derive from plain object: subclassing a torch/nnsight type would inherit
    # methods (e.g. nn.Module.to) past the attribute guard.
    # RestrictedPython adds `metaclass=__metaclass__` (our namespace's `type`) to every class.
    if bases or any(key != "metaclass" or value is not type for key, value in kwargs.items()):
        raise CapabilityDenied("classes in the sandbox cannot have base classes or metaclasses; "
                               "write `class Name:` and keep data in attributes")
    return builtins.__build_class__(func, name)


# The request-independent part of the sandbox's builtins (built once: denied names raise,
# safe ones are the real builtins); `Guards.builtins` adds the guarded ones per request.
_STATIC_BUILTINS: dict[str, Any] = {
    **{name: _denied_builtin(name) for name in _DENIED_BUILTINS},
    **{name: vars(builtins)[name] for name in _SAFE_BUILTIN_NAMES},
    "__build_class__": _guarded_build_class,
    "__name__": "sandbox",
}


def _is_module(obj: Any) -> bool:
    import torch

    return isinstance(obj, torch.nn.Module)


def _library_of(obj: Any) -> str:
    owner = obj if isinstance(obj, type) else type(obj)
    return str(owner.__module__).split(".")[0]


def _is_tracer(obj: Any) -> bool:
    from nnsight.tracing.tracer import Tracer

    return isinstance(obj, Tracer) or (isinstance(obj, type) and issubclass(obj, Tracer))


def _is_envoy(obj: Any) -> bool:
    from nnsight.intervention.envoy import Envoy

    return isinstance(obj, Envoy)


_CONTAINER_TYPES = (list, dict, set, OrderedDict, bytearray)
_CONTAINER_MUTATORS = frozenset(
    {
        "append", "extend", "insert", "remove", "pop", "clear", "sort", "reverse", "update", "setdefault",
        "popitem", "add", "discard", "difference_update", "intersection_update", "symmetric_difference_update",
        "move_to_end",
    }
)

_INPLACE_OPS: Mapping[str, Callable[[Any, Any], Any]] = {
    "+=": operator.iadd, "-=": operator.isub, "*=": operator.imul, "/=": operator.itruediv,
    "//=": operator.ifloordiv, "%=": operator.imod, "**=": operator.ipow, "@=": operator.imatmul,
    "<<=": operator.ilshift, ">>=": operator.irshift, "&=": operator.iand, "|=": operator.ior,
    "^=": operator.ixor,
}


# --------------------------------------------------------------------------------------------
# nnsight's run-time capture of inner `with` blocks: compile them restricted while sandboxed.

_ACTIVE = threading.local()
_HOOK_LOCK = threading.Lock()


class sandboxed_compilation:
    """Context manager: while active on this thread, nnsight compiles captured blocks restricted."""

    def __enter__(self) -> None:
        _ACTIVE.depth = getattr(_ACTIVE, "depth", 0) + 1

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.depth -= 1


def is_sandboxed() -> bool:
    return getattr(_ACTIVE, "depth", 0) > 0


def install_compile_hook() -> None:
    """Wrap `Tracer.compile` once per process so inner blocks compile restricted when sandboxed."""
    from nnsight.tracing.tracer import Tracer

    with _HOOK_LOCK:
        if getattr(Tracer.compile, "_sandbox_hook", False):
            return
        original = Tracer.compile

        def compile_hook(self: Any, module: ast.Module, frame: types.FrameType) -> types.CodeType:
            if is_sandboxed():
                filename, name = frame.f_code.co_filename, frame.f_code.co_name
                text = _block_text(module, filename)
                if text is not None:  # the same inner block as an earlier request: reuse its code
                    return _compile_text(text, filename, name)
                return restricted_compile(module, filename, name)
            compiled: types.CodeType = original(self, module, frame)
            return compiled

        compile_hook._sandbox_hook = True  # type: ignore[attr-defined]
        Tracer.compile = compile_hook
        _install_remote_hook()


def _install_remote_hook() -> None:
    """A sandboxed body may not open its own remote/"local" trace: that would make the server a
    client (network egress, a second unsandboxed deserialisation)."""
    from nnsight.modeling.mixins.remotable import Remotable

    for method in ("trace", "session"):
        original = getattr(Remotable, method)

        def hook(self: Any, *args: Any, _original: Any = original, _name: str = method, **kwargs: Any) -> Any:
            positional_backend = _name == "session" and bool(args) and args[0] is not None
            if is_sandboxed() and (kwargs.get("remote") or kwargs.get("backend") is not None or positional_backend):
                raise CapabilityDenied("remote=/backend= are not available inside a remote request")
            return _original(self, *args, **kwargs)

        hook.__name__ = hook.__qualname__ = method
        hook.__doc__ = original.__doc__
        setattr(Remotable, method, hook)


def _block_text(module: ast.Module, filename: str) -> str | None:
    """The captured block as text padded to its line numbers, from the request's own source."""
    import linecache

    if not module.body:
        return None
    first, last = module.body[0].lineno, module.body[-1].end_lineno
    lines = linecache.getlines(filename)
    if last is None or last > len(lines):
        return None
    # The block's indentation in the file: nnsight parses a block dedented to its `with` line, so
    # the nodes' col_offset is relative to that line, not to the file.
    indent = len(lines[first - 1]) - len(lines[first - 1].lstrip())
    chunk = lines[first - 1 : last]
    if any(line.strip() and len(line) - len(line.lstrip()) < indent for line in chunk):
        return None
    return "\n" * (first - 1) + "".join(line[indent:] if line.strip() else "\n" for line in chunk)


def restricted_function(
    source: str, name: str, origin_filename: str, origin_line: int, namespace: dict[str, Any],
    defaults: Iterable[Any] | None = None,
) -> types.FunctionType:
    """Rebuild a shipped helper function from its source, compiled restricted (cf. nnsight's
    `_load_function`, which compiles with the stock compiler)."""
    padded = "\n" * (max(origin_line, 1) - 1) + source
    filename = sources.current().register(padded, origin_filename, part=name)
    module_code = restricted_compile(padded, filename)
    func_code = None
    for const in module_code.co_consts:
        if isinstance(const, types.CodeType) and const.co_name == name:
            func_code = const
    if func_code is None:
        raise CodeRejected(f"shipped function {name!r} has no matching definition in its source")
    return types.FunctionType(func_code, dict(namespace), name, tuple(defaults) if defaults else None)

"""Tensor rules enforced at torch's dispatcher, below every Python name a request can reach.

    index = ServerStorage.of_modules([model._module])
    with WriteGuard(index) as guard:      # on the thread that runs the request
        ...                               # user code, nnsight hooks, the model's forward

`WriteGuard` is a `TorchDispatchMode`: every aten op the request thread dispatches passes through
it (user code, the model's forward, nnsight's hooks and the backward pass, which inherits the
thread's dispatch modes), after autograd and composite decomposition, in the form the kernel
will run. Two rules:

* **No writes into server storage.** An op whose schema marks an argument as written
  (`alias_info.is_write`: in-place ops, `out=` variants, running-stat updates such as
  `native_batch_norm`'s `running_mean`/`running_var`, `embedding_renorm_`, `resize_`, `set_`,
  `copy_`, `detach_`, ...) is refused when the written tensor's storage overlaps the memory of a
  tensor the server owns. Ownership is a byte range of the storage, not a name: a view, a
  `detach()`, a `state_dict()` entry, a tensor built over the same storage or any alias a
  Python-level check did not foresee all overlap the same bytes. The check happens before the
  kernel runs, so a refused op writes nothing.
* **No uninitialised memory.** Every allocation that would hand out uninitialised memory
  (`empty`, `empty_like`, `new_empty`, `empty_strided`, `empty_permuted`, ..., and the part of a
  tensor `resize_` grows into) comes back zeroed: freed memory can hold an earlier request's
  activations.

While a request's budget is bound (`work_bounds.request_budget`), the Python mode also raises the
request's stop at every op once it was set and prices the heavy op families (`work_bounds.COSTS`)
against the time left, as the native kernels do (`work_bounds/` says what it cannot see).

The name lists in the restricted compiler and the capability proxies stay as early, friendlier
errors; this guard holds without them. What it cannot see: writes that do not go through the
dispatcher (a raw pointer handed to native code: numpy views, DLPack, storage-level C calls
such as `UntypedStorage.__init__`), which the Python layers deny and `integrity.py` detects.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._C import _dispatch_has_kernel_for_dispatch_key
from torch.utils._python_dispatch import TorchDispatchMode

from model_runtime.sandbox import work_bounds
from model_runtime.sandbox.errors import ModelTampering

# aten ops (by overload packet name) that return memory nobody has written yet.
UNINITIALISED_ALLOCATORS = frozenset(
    {
        "empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "empty_permuted",
        "_empty_affine_quantized", "_empty_per_channel_affine_quantized", "empty_quantized",
    }
)
# Arguments some batch-norm kernels update in place although their schema does not say so
# (`native_batch_norm`, `cudnn_batch_norm`, `miopen_batch_norm`, the sync-BN stats ops): written
# when the op's `training` argument is true, or always when it has none.
UNDECLARED_RUNNING_STATS = frozenset({"running_mean", "running_var"})
STATS_FLAGS = frozenset({"training", "use_input_stats"})
# ...except in the variants that only read them or return updated copies.
STATS_READ_ONLY = ("backward", "no_update", "no_training", "functional")
# In-place ops that may grow a tensor's storage: the new bytes are uninitialised.
GROWING = frozenset({"resize_", "resize_as_", "_resize_output_", "resize_as_sparse_"})


def _storage_range(tensor: torch.Tensor) -> tuple[int, int] | None:
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None  # sparse, nested or wrapper tensors: no plain storage of their own
    start = int(storage.data_ptr())
    return (start, start + int(storage.nbytes())) if start else None


def module_tree(roots: Iterable[torch.nn.Module]) -> list[torch.nn.Module]:
    """The modules under `roots`, each once, in `Module.modules()` order (depth first, parents
    before children), read straight from each module's `_modules` table: `modules()` goes through
    `named_modules()`, which builds every module's dotted name, and the integrity checks walk the
    tree on every request."""
    out: list[torch.nn.Module] = []
    seen: set[int] = set()
    stack = list(roots)[::-1]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        out.append(module)
        children = [child for child in module._modules.values() if child is not None]
        children.reverse()
        stack += children
    return out


def server_tensors(modules: Iterable[torch.nn.Module]) -> list[torch.Tensor]:
    """Every tensor the model owns: parameters, buffers, and tensors kept as plain module
    attributes (rotary caches and the like), each once."""
    seen: dict[int, torch.Tensor] = {}
    for module in module_tree(modules):
        for table in (module._parameters, module._buffers, module.__dict__):
            for value in table.values():
                if isinstance(value, torch.Tensor):
                    seen.setdefault(id(value), value)
    return [local_shard(t) for t in seen.values()]


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor holding the data in this process: a DTensor's (tensor parallelism) local shard."""
    if type(tensor) in _PLAIN_TENSORS:  # the usual case, without a failed attribute lookup
        return tensor
    local = getattr(tensor, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else tensor


@dataclass(frozen=True)
class ServerStorage:
    """The byte ranges of the server's tensors' storages, merged and sorted for bisection."""

    starts: tuple[int, ...] = ()
    ends: tuple[int, ...] = ()

    @classmethod
    def of(cls, tensors: Iterable[torch.Tensor]) -> ServerStorage:
        return cls._merged([r for r in map(_storage_range, tensors) if r is not None])

    def including(self, tensors: Iterable[torch.Tensor]) -> ServerStorage:
        """These ranges and the storages of `tensors`."""
        return self._merged([*zip(self.starts, self.ends, strict=True),
                             *(r for r in map(_storage_range, tensors) if r is not None)])

    @classmethod
    def _merged(cls, spans: list[tuple[int, int]]) -> ServerStorage:
        ranges = sorted(spans)
        merged: list[list[int]] = []
        for start, end in ranges:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return cls(tuple(r[0] for r in merged), tuple(r[1] for r in merged))

    @classmethod
    def of_modules(cls, modules: Iterable[torch.nn.Module]) -> ServerStorage:
        return cls.of(server_tensors(modules))

    def owns(self, tensor: Any) -> bool:
        """True when `tensor`'s storage overlaps memory the server owns."""
        if not isinstance(tensor, torch.Tensor):
            return False
        span = _storage_range(tensor)
        if span is None:
            return False
        # the last server range starting before this storage ends must end after it starts
        i = bisect.bisect_left(self.starts, span[1]) - 1
        return i >= 0 and self.ends[i] > span[0]


def guard_also(tensors: Iterable[torch.Tensor]) -> None:
    """Refuse writes into `tensors` too for the rest of this thread's request, as into the model's
    own (a server-made copy the request may read, e.g. a tensor-parallel weight gathered whole).
    Nothing to do when no guard is active on this thread (the sandbox is off)."""
    active = getattr(_ACTIVE, "guards", None)
    if active:
        active[-1].also(list(tensors))


_ACTIVE = threading.local()  # this thread's entered WriteGuards, innermost last
_BOUND = work_bounds.BOUND  # this thread's request budget (the Python guard's)


@dataclass(frozen=True)
class _OpRule:
    written: tuple[tuple[int, str], ...]  # (position, name) of each argument the op writes
    stats: tuple[tuple[int, str], ...]  # running statistics it updates without declaring it
    training: tuple[int, str] | None  # the flag that turns those updates on
    allocates: bool  # returns uninitialised memory
    grows: bool  # may grow its first argument's storage
    cost: int = 0  # how the op is priced (`work_bounds.COSTS`; 0: not priced)


def op_rule(func: torch._ops.OpOverload) -> _OpRule:
    """What the guard must do for `func`, read off its schema (cached per op by the guard)."""
    schema = func._schema
    written = tuple(
        (i, arg.name)
        for i, arg in enumerate(schema.arguments)
        if arg.alias_info is not None and arg.alias_info.is_write
    )
    name = func._opname
    stats = tuple(
        (i, arg.name)
        for i, arg in enumerate(schema.arguments)
        if arg.name in UNDECLARED_RUNNING_STATS
        and (arg.alias_info is None or not arg.alias_info.is_write)
        and not any(part in name for part in STATS_READ_ONLY)
    )
    training = next(((i, a.name) for i, a in enumerate(schema.arguments) if a.name in STATS_FLAGS), None)
    return _OpRule(written, stats, training, name in UNINITIALISED_ALLOCATORS, name in GROWING,
                   work_bounds.cost_kind(name, schema.overload_name))


def _argument(position: int, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[position] if position < len(args) else kwargs.get(name)


def written_tensors(rule: _OpRule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors this call of the op will write."""
    targets = rule.written
    if rule.stats and (rule.training is None or _argument(*rule.training, args, kwargs)):
        targets = targets + rule.stats
    out: list[torch.Tensor] = []
    for position, name in targets:
        value = _argument(position, name, args, kwargs)
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, (list, tuple)):  # Tensor(a!)[] (e.g. _foreach_*_)
            out.extend(v for v in value if isinstance(v, torch.Tensor))
    return out


@dataclass
class GuardCounters:
    refused: int = 0
    zeroed: int = 0
    refused_ops: list[str] = field(default_factory=list)


class PythonWriteGuard(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """The rules as a Python dispatch mode: the fallback when the native kernels are not built.

    Enter it on the thread that runs the request (modes are per thread).

    Every op the thread dispatches comes through `__torch_dispatch__`, so its fast path (an op
    with nothing to check) is one set lookup and the call, after the request's stop: while a
    request's budget is bound (`work_bounds.request_budget`), every op raises the stop once it was
    set, and the priced ops (`work_bounds.COSTS`) are priced against the time left before they
    run (views after they are made), with the native kernels' formulas, rates and messages.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch otherwise wraps `__torch_dispatch__` in a dynamo-disabling shim that costs about
        # a microsecond per op; nothing compiles with dynamo in a replica.
        return False

    def __init__(self, storage: ServerStorage) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.storage = storage
        self.counters = GuardCounters()
        self._rules: dict[Any, _OpRule] = {}
        self._plain: set[Any] = set()  # ops with nothing to check
        self._composite: set[Any] = set()  # ops seen whole that have a composite decomposition

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        budget = _BOUND.budget
        if budget is not None and budget.stopped:
            work_bounds.raise_stop(budget, func._opname)
        if func in self._plain:
            return func._op(*args, **kwargs) if kwargs else func._op(*args)
        return self._checked(func, args, kwargs or {}, budget)

    def _checked(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                 budget: work_bounds.Budget | None) -> Any:
        rule = self._rules.get(func)
        if rule is None:
            rule = self._rules[func] = op_rule(func)
            if _dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
                self._composite.add(func)
            elif not (rule.written or rule.stats or rule.allocates or rule.grows or rule.cost):
                self._plain.add(func)
        if rule.cost and budget is not None:
            work_bounds.check_op(budget, rule.cost, func, args, kwargs)
        if rule.written or rule.stats:
            owns = self.storage.owns
            for tensor in written_tensors(rule, args, kwargs):
                if owns(tensor):
                    self.counters.refused += 1
                    if len(self.counters.refused_ops) < 16:
                        self.counters.refused_ops.append(str(func))
                    raise ModelTampering(
                        f"{func._opname} would write into memory of the served model (a weight, buffer "
                        "or a view of one); work on a copy: `x = tensor.clone()`"
                    )
            if rule.grows:
                return self._grow_zeroed(func, args, kwargs)
        if func in self._composite:
            # Seen before its decomposition (inference mode, inference tensors: no autograd key to
            # decompose it above this mode): decomposed here, under this mode, so the ops it is
            # made of are checked, priced and stopped as they are everywhere else.
            with self:
                result = func.decompose(*args, **kwargs)
        else:
            result = func(*args, **kwargs)
        if rule.cost == work_bounds.Cost.VIEW and budget is not None:
            # set_ / as_strided_: the argument is the view; else what the op returned
            view = args[0] if rule.written and args else result
            for made in view if isinstance(view, (list, tuple)) else (view,):
                work_bounds.check_view(budget, func._opname, made)
        if rule.allocates and isinstance(result, torch.Tensor):
            self.counters.zeroed += 1
            result.zero_()
        return result

    def _grow_zeroed(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        target = args[0] if args else None
        before = _storage_range(target) if isinstance(target, torch.Tensor) else None
        result = func(*args, **kwargs)
        after = _storage_range(target) if isinstance(target, torch.Tensor) else None
        if isinstance(target, torch.Tensor) and after is not None:
            # resize_ keeps the old bytes at the front (copied if it reallocated); the rest is new
            old = 0 if before is None else before[1] - before[0]
            if after[1] - after[0] > old:
                self.counters.zeroed += 1
                raw = torch.empty(0, dtype=torch.uint8, device=target.device)
                raw.set_(target.untyped_storage())
                raw[old:].zero_()
        return result


_fallback_logged = False


def prepare() -> bool:
    """Load and install the native kernels now (a replica at start-up, so its first request does
    not pay for it); True when requests will run under them, else the fallback is logged and the
    rates it prices ops at are measured."""
    from model_runtime.sandbox import native_guard

    if native_guard.load() is not None:
        return True
    _log_fallback(native_guard.failure())
    work_bounds.measure_rates()
    return False


class WriteGuard:
    """The guard a request runs under: the native dispatcher kernels (`native_guard.py`) when
    they are built and load, else `PythonWriteGuard` with the same rules (slower), and the reason
    logged once. Never unguarded."""

    def __init__(self, storage: ServerStorage) -> None:
        from model_runtime.sandbox import native_guard

        self.storage = storage
        self.native = prepare()
        self._impl: Any = native_guard.NativeWriteGuard(storage) if self.native else PythonWriteGuard(storage)

    def __enter__(self) -> WriteGuard:
        self._impl.__enter__()
        self._extra_tokens: list[int] = []
        self._kept: list[torch.Tensor] = []
        if not hasattr(_ACTIVE, "guards"):
            _ACTIVE.guards = []
        _ACTIVE.guards.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.guards.remove(self)
        for token in self._extra_tokens:
            self._impl._native.remove_table(token)
        self._kept.clear()
        self._impl.__exit__(*exc)

    def also(self, tensors: list[torch.Tensor]) -> None:
        """Guard these tensors' storage until this guard exits. They are kept alive until then:
        freed, their memory could be handed to a later allocation of the same request, which the
        guard would then refuse to write."""
        self._kept.extend(tensors)
        extra = ServerStorage.of(tensors)
        if self.native:
            self._extra_tokens.append(self._impl._native.add_table(list(extra.starts), list(extra.ends)))
        else:
            self._impl.storage = self._impl.storage.including(tensors)


def _log_fallback(reason: str | None) -> None:
    global _fallback_logged
    if not _fallback_logged:
        _fallback_logged = True
        logging.getLogger(__name__).warning(
            "native write guard unavailable (%s): requests run under the Python dispatch mode "
            "(same rules, a Python call per aten op)", reason
        )

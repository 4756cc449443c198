"""Layer 4: the served model's weights and the process-wide state later requests rely on.

Two mechanisms, because neither is enough alone:

* **Refuse at the point of writing.** Every tensor whose storage belongs to a parameter or
  buffer of the served model is *protected* (checked by storage pointer, so views, `detach()`
  and `state_dict()` entries are covered too). The restricted compiler's write guard, its
  attribute guard (in-place methods, `.data`, `.numpy()`, `.to`/`load_state_dict` on modules)
  and the capability proxies (`out=`, `inplace=True`) all ask `is_protected`.
* **Detect after the fact.** Every in-place torch op bumps the tensor's version counter, which
  views and `detach()` share. `WeightGuard.check()` compares each parameter's and buffer's
  `_version` with the value recorded at start: anything the write-time checks missed fails the
  request (and the replica is reported as tainted so the runtime can reload it).

`ProcessState` snapshots what a request can change in the process (torch default dtype, grad
mode, `sys.modules`, builtins) and restores it after every request, whatever the outcome (the RNG
states and the other torch and interpreter settings are `global_state.py`'s, restored on the
request's thread); nnsight's block caches and `linecache` are restored by the runtime's
`model_runtime.replica.execution.nnsight_caches_restored`, around both the sandboxed and the plain path.
"""

from __future__ import annotations

import builtins
import operator
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from model_runtime.sandbox.dict_versions import VersionedCopy
from model_runtime.sandbox.dispatch_guard import local_shard, module_tree
from model_runtime.sandbox.errors import ModelTampering

# Module methods that move, retype, reload or re-hook a module: all change what the next
# request sees, so user code may not call them on the served model (or any nn.Module).
MODULE_MUTATORS = frozenset(
    {
        "to", "cuda", "cpu", "xpu", "ipu", "mps", "half", "float", "double", "bfloat16", "type",
        "to_empty", "load_state_dict", "apply", "requires_grad_", "zero_grad", "train", "eval",
        "share_memory", "register_buffer", "register_parameter", "register_module", "add_module",
        "set_submodule", "register_forward_hook", "register_forward_pre_hook",
        "register_full_backward_hook", "register_full_backward_pre_hook", "register_backward_hook",
        "register_load_state_dict_post_hook", "register_load_state_dict_pre_hook",
        "register_state_dict_pre_hook", "register_state_dict_post_hook", "compile", "dispatch",
        "set_attn_implementation", "tie_weights", "resize_token_embeddings", "save_pretrained",
        "push_to_hub", "from_pretrained", "init_weights", "post_init", "gradient_checkpointing_enable",
        "set_input_embeddings", "set_output_embeddings", "load_adapter", "add_adapter",
        "set_adapter", "enable_adapters", "disable_adapters", "delete_adapter", "fuse_qkv_projections",
        "_remoteable_set_env",
    }
)

# Tensor attributes that alias or rewrite storage outside the version counter, or move memory.
TENSOR_ALIASING = frozenset(
    {
        "data", "set_", "untyped_storage", "storage", "numpy", "share_memory_", "pin_memory",
        "resize_", "resize_as_", "requires_grad_", "retain_grad", "register_hook",
        "register_post_accumulate_grad_hook", "detach_", "as_strided_",
        "module_load", "copy_", "swap_",
    }
)


# Modules whose replacement in sys.modules would change what the server or the sandbox runs.
CRITICAL_MODULES = (
    "builtins", "sys", "os", "posix", "io", "abc", "types", "importlib", "linecache", "pickle",
    "copyreg", "subprocess", "socket", "ctypes", "threading", "json", "math", "cmath", "collections",
    "itertools", "functools", "operator", "statistics", "re", "typing", "random", "time", "torch", "torch.nn",
    "torch.nn.functional", "torch.nn.init", "torch.linalg", "torch.fft", "torch.special",
    "torch.distributions", "torch.autograd", "numpy", "numpy.linalg", "einops", "nnsight",
    "nnsight.intervention.envoy", "nnsight.intervention.tracer", "nnsight.intervention.interleaver",
    "nnsight.intervention.serialization", "nnsight.tracing.tracer", "nnsight.tracing.globals",
    "nnsight.modeling.transformers", "transformers", "cloudpickle", "zstandard", "RestrictedPython",
    "model_runtime.sandbox.capabilities", "model_runtime.sandbox.compiling", "model_runtime.sandbox.guards",
    "model_runtime.sandbox.executor", "model_runtime.sandbox.limits",
    "model_runtime.sandbox.model_guard", "model_runtime.sandbox.unpickling",
)


_ABSENT = object()  # a dict entry that is not there
_VERSION = operator.attrgetter("_version")  # a tensor's version counter (its views' too)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor holding the data on this process: a DTensor's (tensor parallelism) local shard."""
    return local_shard(tensor)


def _storage_ptr(tensor: torch.Tensor) -> int | None:
    try:
        return int(_local(tensor).untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return None  # meta / sparse / fake tensors have no inspectable storage


@dataclass
class WeightGuard:
    """Knows the served model's parameter and buffer storages and their version counters."""

    modules: list[torch.nn.Module]
    _ptrs: frozenset[int] = frozenset()
    _tensors: list[torch.Tensor] = field(default_factory=list)
    _versions: list[int] = field(default_factory=list)
    _source: list[torch.Tensor] | None = None  # the integrity index the tensors came from
    #: Set when `check()` found a change: the weights must be reloaded before serving again.
    tainted: bool = False

    def __post_init__(self) -> None:
        self.arm()

    def arm(self, tensors: list[torch.Tensor] | None = None) -> None:
        """Index the weights and record their version counters at the start of a request.

        `tensors`: the parameters and buffers as the integrity check has just indexed and
        admitted them (`WeightIntegrity.tensors`), saving a second walk of the module tree; while
        it is the same list, its storages are the ones indexed (the integrity check re-indexes,
        giving a new list, when a pointer moved), so only the version counters are read again.
        Without it the tree is walked here. Moving the model between CPU RAM and GPU
        (WARM <-> HOT) gives every parameter new storage.
        """
        if tensors is not None:
            if tensors is not self._source:
                self._source = tensors
                self._tensors = [_local(t) for t in tensors]
                self._ptrs = frozenset(p for p in (_storage_ptr(t) for t in self._tensors) if p)
            self._versions = list(map(_VERSION, self._tensors))
            return
        self._source = None
        # One walk over the module tree reading each module's own tables (what `parameters()` and
        # `buffers()` yield, without walking the tree twice through their generators).
        seen: dict[int, torch.Tensor] = {}
        for module in module_tree(self.modules):
            for table in (module._parameters, module._buffers):
                for tensor in table.values():
                    if tensor is not None:
                        # A tensor-parallel weight is a DTensor: its bytes and version counter are
                        # its local shard's (in-place ops on the DTensor land there).
                        local = local_shard(tensor)
                        seen.setdefault(id(local), local)
        # A DTensor parameter's data and version counter are its local shard's.
        self._tensors = [_local(t) for t in seen.values()]
        self._ptrs = frozenset(p for p in (_storage_ptr(t) for t in self._tensors) if p)
        self._versions = list(map(_VERSION, self._tensors))

    def is_protected(self, value: Any) -> bool:
        """True for a weight or buffer of the served model, or any tensor sharing its storage."""
        if isinstance(value, torch.nn.Module):
            return True
        if not isinstance(value, torch.Tensor):
            return False
        if isinstance(value, torch.nn.Parameter):
            return True
        ptr = _storage_ptr(value)  # a DTensor alias of a shard: its local shard's
        return ptr is not None and ptr in self._ptrs

    def check(self) -> None:
        """Fail if any weight or buffer changed in place since `arm()`."""
        now = list(map(_VERSION, self._tensors))  # (compared at C speed; the loop only on a change)
        if now == self._versions:
            return
        changed = [i for i, (v, w) in enumerate(zip(now, self._versions, strict=True)) if v != w]
        if changed:
            self.tainted = True
            raise ModelTampering(
                f"the request modified {len(changed)} weight/buffer tensor(s) in place; "
                "the replica's weights are no longer trustworthy"
            )


def _critical(modules: dict[str, Any]) -> list[Any]:
    return list(map(modules.get, CRITICAL_MODULES))


# Read again only once written (`dict_versions`): between requests neither table usually changes.
_BUILTINS = VersionedCopy(vars(builtins), dict)
_MODULES = VersionedCopy(sys.modules, _critical)


@dataclass
class ProcessState:
    """A snapshot of the process-wide state a request can reach, restored by `restore()`.

    The builtins dict and the critical `sys.modules` entries are each a copy made when the table
    was last written (shared by the requests that find it unwritten since, never modified) and the
    table's version tag: a table whose tag has not moved was not written, and is not compared."""

    default_dtype: torch.dtype
    grad_enabled: bool
    inference_mode: bool
    modules_len: int
    modules_version: int | None
    critical_modules: list[Any]  # `sys.modules.get` of each of CRITICAL_MODULES, in its order
    builtins_version: int | None
    builtins_dict: dict[str, Any]

    @classmethod
    def capture(cls) -> ProcessState:
        global _MODULES
        if _MODULES.table is not sys.modules:  # rebound (no sandboxed code can reach `sys`)
            _MODULES = VersionedCopy(sys.modules, _critical)
        modules_version, critical = _MODULES.current()
        builtins_version, builtins_dict = _BUILTINS.current()
        return cls(
            default_dtype=torch.get_default_dtype(),
            grad_enabled=torch.is_grad_enabled(),
            inference_mode=torch.is_inference_mode_enabled(),
            modules_len=len(sys.modules),
            modules_version=modules_version,
            critical_modules=critical,
            builtins_version=builtins_version,
            builtins_dict=builtins_dict,
        )

    def restore(self) -> list[str]:
        """Put everything back; returns the names of what had changed (for the request's meta)."""
        changed: list[str] = []
        if torch.get_default_dtype() != self.default_dtype:
            changed.append("default_dtype")
            torch.set_default_dtype(self.default_dtype)
        if torch.is_grad_enabled() != self.grad_enabled:
            changed.append("grad_mode")
            torch.set_grad_enabled(self.grad_enabled)
        # sys.modules: sandboxed code cannot reach it (no `sys`, no raw modules), so this is a
        # backstop after an escape, kept cheap (copying ~3,000 entries cost ~1 ms a request):
        # the modules the sandbox and the server rely on are checked by identity. New entries
        # are reported, not removed: lazy imports by the server are legitimate, and aliases
        # (`os.path` is `posixpath`) make "not a module under its own name" no test of foul play.
        # (Not written since the capture: nothing to compare. Else compared at C speed first:
        # the loop runs only when an entry differs.)
        modules = sys.modules
        if not (modules is _MODULES.table and _MODULES.unchanged_since(self.modules_version)):
            if not all(map(operator.is_, map(modules.get, CRITICAL_MODULES), self.critical_modules)):
                for name, module in zip(CRITICAL_MODULES, self.critical_modules, strict=True):
                    if modules.get(name) is not module:
                        changed.append(f"sys.modules[{name!r}]")
                        if module is None:
                            modules.pop(name, None)
                        else:
                            modules[name] = module
            if len(modules) != self.modules_len:
                changed.append("sys.modules grew")
        current = vars(builtins)
        if not _BUILTINS.unchanged_since(self.builtins_version) and current != self.builtins_dict:
            changed.append("builtins")
            # Entry by entry, never emptied: the process's other threads (Ray's event loops) keep
            # finding every builtin while it is put back.
            for name in current.keys() - self.builtins_dict.keys():
                del current[name]
            for name, value in self.builtins_dict.items():
                if current.get(name, _ABSENT) is not value:
                    current[name] = value
        return changed

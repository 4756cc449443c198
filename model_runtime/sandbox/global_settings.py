"""The catalogue of global state a request could change: each torch or interpreter setting as a
getter and a setter (`Setting`), with the torch setter names it covers.

    SETTINGS    # every setting, in the order they are read and put back

`model_runtime/sandbox/global_state.py` snapshots them around each request and puts back what
moved; `tests/sandbox/test_global_state.py` enumerates torch's setters and fails on any that is
neither covered here nor unreachable from sandboxed code. The setters here that torch lacks (the
autocast nesting, inference mode, the opt_einsum flags, warnings, the environment) put a value
back as the matching getter read it.
"""

from __future__ import annotations

import functools
import operator
import os
import random
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from model_runtime.sandbox.dict_versions import VersionedCopy, versions

_C: Any = torch._C


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "xla", "ipu", "hpu", "mtia", "maia")


@dataclass(frozen=True)
class Setting:
    name: str
    get: Callable[[], Any]
    set: Callable[[Any], object]
    covers: tuple[str, ...] = ()  # dotted names of the torch setters this restores
    rng: bool = False  # tests and the server reseed between requests: not checked between requests


def _c_pair(getter: str, setter: str, *covers: str) -> Setting | None:
    get, put = getattr(_C, getter, None), getattr(_C, setter, None)
    if get is None or put is None:
        return None
    # a few getters return a tuple (e.g. cuBLAS reduced-precision: allow, allow split-K) that
    # their setter takes as separate arguments
    setting = Setting(setter.lstrip("_"), get, lambda v: put(*v) if isinstance(v, tuple) else put(v),
                      (f"torch._C.{setter}", *covers))
    try:
        setting.set(setting.get())  # a pair that cannot put back its own value is no restore
    except (RuntimeError, TypeError, ValueError):
        return None
    return setting


def _autocast(device: str) -> list[Setting]:
    try:
        torch.is_autocast_enabled(device)
        torch.get_autocast_dtype(device)
    except (RuntimeError, TypeError):
        return []
    # getters as C-level partials: read twice per request, no Python frame each
    return [
        Setting(
            f"autocast[{device}]",
            functools.partial(torch.is_autocast_enabled, device),
            lambda v: torch.set_autocast_enabled(device, v),
            ("torch.set_autocast_enabled", f"torch.set_autocast_{device}_enabled".replace("cuda", "gpu")),
        ),
        Setting(
            f"autocast_dtype[{device}]",
            functools.partial(torch.get_autocast_dtype, device),
            lambda v: torch.set_autocast_dtype(device, v),
            ("torch.set_autocast_dtype", f"torch.set_autocast_{device}_dtype".replace("cuda", "gpu")),
        ),
    ]


def _autocast_nesting() -> int:
    depth = torch.autocast_increment_nesting()
    torch.autocast_decrement_nesting()
    return int(depth) - 1


def _set_autocast_nesting(depth: int) -> None:
    current = _autocast_nesting()
    while current > depth:
        current = int(torch.autocast_decrement_nesting())
    while current < depth:
        current = int(torch.autocast_increment_nesting())


# Never freed: a guard's destructor puts back the state it saw, on whichever thread frees it. Kept
# per thread, a retired request thread's guards were freed on the runtime's caller thread and put
# that thread in inference mode. A guard is made only when a request left the mode changed after
# its objects were freed (finalisers.py): rare, a few bytes each.
_INFERENCE_GUARDS: list[Any] = []


def set_inference_mode(enabled: bool) -> None:
    # Inference mode is a RAII guard in C++: the only way to change it is to hold a guard.
    _INFERENCE_GUARDS.append(_C._InferenceMode(enabled))


def _set_stack_length(length: int, size: Callable[[], int], pop: Callable[[], Any]) -> None:
    while size() > length:
        pop()  # a mode the request pushed and left (e.g. `set_default_device`'s device context)


_CPU = torch.device("cpu")
_DEVICE_CONTEXT: Any = getattr(torch, "_GLOBAL_DEVICE_CONTEXT", None)


def _default_device() -> torch.device:
    # `torch.get_default_device()` answers CPU when no device context is on the torch-function
    # mode stack and none is set globally; that is decided here without its imports and scan
    # (read twice per request). Any other state takes torch's own path.
    if _DEVICE_CONTEXT is not None and not _C._len_torch_function_stack() and getattr(
        _DEVICE_CONTEXT, "device_context", None
    ) is None:
        return _CPU
    return torch.get_default_device()


def _set_default_device(device: torch.device) -> None:
    torch.set_default_device(None if device == torch.device("cpu") else device)


def _set_deterministic(value: tuple[bool, bool]) -> None:
    torch.use_deterministic_algorithms(value[0], warn_only=value[1])


def _set_anomaly(value: tuple[bool, bool]) -> None:
    torch.set_anomaly_enabled(value[0], value[1])


# `torch.backends.opt_einsum` is a module object whose class declares no properties (the class
# body's `global` statements send its `ContextProp`s to the module's globals): its `enabled` and
# `strategy` are the instance's own entries when something assigned them (what `einsum` reads
# first), else the original module's globals (what `set_flags`/`flags()` change). Both places are
# read from their dicts (reading the attributes goes through a failed lookup: ~2 us each).
_OPT_EINSUM: Any = torch.backends.opt_einsum
_OPT_EINSUM_GLOBALS: dict[str, Any] = _OPT_EINSUM.m.__dict__
_OPT_EINSUM_KEYS = ("enabled", "strategy")
_OPT_EINSUM_MODULE = operator.itemgetter(*_OPT_EINSUM_KEYS)
_ABSENT = object()


# Both dicts are fixed objects (a module's `__dict__` cannot be replaced): read again only once one
# was written, by their version tags (`dict_versions`).
_OPT_EINSUM_DICTS: list[dict[str, Any]] = [vars(_OPT_EINSUM), _OPT_EINSUM_GLOBALS]
_OPT_EINSUM_LAST: tuple[list[int] | None, tuple[Any, ...]] = (None, ())  # (the tags, the value read at them)


def _opt_einsum() -> tuple[Any, ...]:
    global _OPT_EINSUM_LAST
    tags = versions(_OPT_EINSUM_DICTS)  # before the read: a later write moves them
    last_tags, value = _OPT_EINSUM_LAST
    if tags is None or tags != last_tags:
        own, module = _OPT_EINSUM_DICTS
        value = (own.get("enabled", _ABSENT), own.get("strategy", _ABSENT), *_OPT_EINSUM_MODULE(module))
        _OPT_EINSUM_LAST = (tags, value)  # one tuple: a reader on another thread sees a pair
    return value


def _set_opt_einsum(value: tuple[Any, ...]) -> None:
    own = vars(_OPT_EINSUM)
    for key, item in zip(_OPT_EINSUM_KEYS, value[:2], strict=True):
        if item is _ABSENT:
            own.pop(key, None)
        else:
            own[key] = item
    _OPT_EINSUM_GLOBALS.update(zip(_OPT_EINSUM_KEYS, value[2:], strict=True))


def _print_options() -> tuple[Any, ...]:
    opts = torch._tensor_str.PRINT_OPTS
    return (opts.precision, opts.threshold, opts.edgeitems, opts.linewidth, opts.sci_mode)


def _set_print_options(value: tuple[Any, ...]) -> None:
    opts = torch._tensor_str.PRINT_OPTS
    opts.precision, opts.threshold, opts.edgeitems, opts.linewidth, opts.sci_mode = value


_warnings: Any = warnings  # (its typeshed stub omits the mutable module state used here)


def _warnings_state() -> tuple[Any, ...]:
    return (list(_warnings.filters), _warnings.showwarning, _warnings.formatwarning, _warnings.defaultaction)


def _set_warnings_state(value: tuple[Any, ...]) -> None:
    _warnings.filters[:] = value[0]
    _warnings.showwarning, _warnings.formatwarning, _warnings.defaultaction = value[1], value[2], value[3]
    _warnings._filters_mutated()


# The raw table (100x cheaper to copy than `os.environ`), copied again only once written: an
# unwritten table gives the same copy, which the list comparison then passes by identity.
_ENVIRON = VersionedCopy(os.environ._data, dict)  # type: ignore[attr-defined]


def _environ() -> dict[bytes, bytes]:
    return _ENVIRON.current()[1]


def _set_environ(value: dict[bytes, bytes]) -> None:
    for key in set(os.environ._data) - set(value):  # type: ignore[attr-defined]
        os.environ.pop(os.fsdecode(key), None)
    for key, item in value.items():
        if os.environ._data.get(key) != item:  # type: ignore[attr-defined]
            os.environ[os.fsdecode(key)] = os.fsdecode(item)


def _fp32_precisions() -> list[Setting]:
    getter, setter = getattr(_C, "_get_fp32_precision_getter", None), getattr(_C, "_set_fp32_precision_setter", None)
    if getter is None or setter is None:
        return []
    pairs = [("generic", "all"), ("cuda", "all"), ("cuda", "matmul"), ("cudnn", "all"), ("cudnn", "conv"),
             ("cudnn", "rnn"), ("mkldnn", "all"), ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn")]
    out = []
    for backend, op in pairs:
        try:
            getter(backend, op)
        except (RuntimeError, TypeError):
            continue
        out.append(
            Setting(
                f"fp32_precision[{backend}.{op}]",
                functools.partial(getter, backend, op),
                functools.partial(setter, backend, op),
                ("torch._C._set_fp32_precision_setter", "torch.backends.fp32_precision"),
            )
        )
    return out


def _distribution_validation() -> Setting:
    from torch.distributions import Distribution

    return Setting(
        "distributions.validate_args",
        lambda: Distribution._validate_args,
        Distribution.set_default_validate_args,
        ("torch.distributions.Distribution.set_default_validate_args",),
    )


def _settings() -> list[Setting]:
    c_pairs = [
        _c_pair("_is_fwd_grad_enabled", "_set_fwd_grad_enabled"),
        _c_pair("_is_multithreading_enabled", "_set_multithreading_enabled",
                "torch.autograd.set_multithreading_enabled"),
        _c_pair("_is_view_replay_enabled", "_set_view_replay_enabled"),
        _c_pair("_get_deterministic_fill_uninitialized_memory", "_set_deterministic_fill_uninitialized_memory",
                "torch.utils.deterministic.fill_uninitialized_memory"),
        _c_pair("_get_warnAlways", "_set_warnAlways", "torch.set_warn_always"),
        _c_pair("_get_cudnn_enabled", "_set_cudnn_enabled", "torch.backends.cudnn.enabled"),
        _c_pair("_get_cudnn_benchmark", "_set_cudnn_benchmark", "torch.backends.cudnn.benchmark"),
        _c_pair("_get_cudnn_deterministic", "_set_cudnn_deterministic", "torch.backends.cudnn.deterministic"),
        _c_pair("_get_cudnn_allow_tf32", "_set_cudnn_allow_tf32", "torch.backends.cudnn.allow_tf32"),
        _c_pair("_get_cudnn_depthwise_kernel", "_set_cudnn_depthwise_kernel"),
        _c_pair("_get_cublas_allow_tf32", "_set_cublas_allow_tf32", "torch.backends.cuda.matmul.allow_tf32"),
        _c_pair("_get_cublas_allow_fp16_reduced_precision_reduction",
                "_set_cublas_allow_fp16_reduced_precision_reduction",
                "torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction"),
        _c_pair("_get_cublas_allow_bf16_reduced_precision_reduction",
                "_set_cublas_allow_bf16_reduced_precision_reduction",
                "torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction"),
        _c_pair("_get_cublas_allow_fp16_accumulation", "_set_cublas_allow_fp16_accumulation",
                "torch.backends.cuda.matmul.allow_fp16_accumulation"),
        _c_pair("_get_cpu_allow_fp16_reduced_precision_reduction", "_set_cpu_allow_fp16_reduced_precision_reduction",
                "torch.backends.cpu.allow_fp16_reduced_precision_reduction"),
        _c_pair("_get_mkldnn_enabled", "_set_mkldnn_enabled", "torch.backends.mkldnn.enabled"),
        _c_pair("_get_mkldnn_deterministic", "_set_mkldnn_deterministic", "torch.backends.mkldnn.deterministic"),
        _c_pair("_get_onednn_allow_tf32", "_set_onednn_allow_tf32", "torch.backends.mkldnn.allow_tf32"),
        _c_pair("_get_nnpack_enabled", "_set_nnpack_enabled", "torch.backends.nnpack.enabled"),
        _c_pair("_get_miopen_immediate", "_set_miopen_immediate", "torch.backends.miopen.immediate"),
        _c_pair("_get_qengine", "_set_qengine", "torch.backends.quantized.engine"),
        _c_pair("_get_flash_sdp_enabled", "_set_sdp_use_flash", "torch.backends.cuda.enable_flash_sdp"),
        _c_pair("_get_mem_efficient_sdp_enabled", "_set_sdp_use_mem_efficient",
                "torch.backends.cuda.enable_mem_efficient_sdp"),
        _c_pair("_get_math_sdp_enabled", "_set_sdp_use_math", "torch.backends.cuda.enable_math_sdp"),
        _c_pair("_get_cudnn_sdp_enabled", "_set_sdp_use_cudnn", "torch.backends.cuda.enable_cudnn_sdp"),
        _c_pair("_get_fa3_sdp_enabled", "_set_sdp_use_fa3"),
        _c_pair("_get_overrideable_sdp_enabled", "_set_sdp_use_overrideable"),
        _c_pair("_get_math_sdp_allow_fp16_bf16_reduction", "_set_math_sdp_allow_fp16_bf16_reduction",
                "torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp"),
        _c_pair("_get_sdp_priority_order", "_set_sdp_priority_order"),
        _c_pair("_get_linalg_preferred_backend", "_set_linalg_preferred_backend",
                "torch.backends.cuda.preferred_linalg_library"),
        _c_pair("_get_blas_preferred_backend", "_set_blas_preferred_backend",
                "torch.backends.cuda.preferred_blas_library"),
        _c_pair("_get_rocm_fa_preferred_backend", "_set_rocm_fa_preferred_backend",
                "torch.backends.cuda.preferred_rocm_fa_library"),
        _c_pair("_get_sm_carveout_experimental", "_set_sm_carveout_experimental"),
        _c_pair("_get_autograd_fallback_mode", "_set_autograd_fallback_mode"),
        _c_pair("_is_grad_layout_enforcement_enabled", "_set_grad_layout_enforcement_enabled"),
        _c_pair("_get_backcompat_broadcast_warn", "_set_backcompat_broadcast_warn"),
        _c_pair("_get_backcompat_keepdim_warn", "_set_backcompat_keepdim_warn"),
        _c_pair("_get_torch_function_state", "_set_torch_function_state"),
        _c_pair("_get_tracing_state", "_set_tracing_state"),
        _c_pair("_get_graph_executor_optimize", "_set_graph_executor_optimize"),
        _c_pair("_get_graph_exec_group", "_set_graph_exec_group"),
        _c_pair("_get_dtensor_allow_implicit_replication", "_set_dtensor_allow_implicit_replication"),
        _c_pair("_only_lift_cpu_tensors", "_set_only_lift_cpu_tensors"),
        _c_pair("_meta_in_tls_dispatch_include", "_set_meta_in_tls_dispatch_include"),
        _c_pair("_check_sparse_tensor_invariants", "_set_check_sparse_tensor_invariants",
                "torch.sparse.check_sparse_tensor_invariants"),
        _c_pair("_get_thread_name", "_set_thread_name"),
    ]
    settings = [s for s in c_pairs if s is not None]
    settings += [
        Setting("grad_mode", torch.is_grad_enabled, torch.set_grad_enabled,
                ("torch.set_grad_enabled", "torch._C._set_grad_enabled", "torch.autograd.set_grad_enabled")),
        Setting("inference_mode", torch.is_inference_mode_enabled, set_inference_mode, ("torch.inference_mode",)),
        Setting("autocast_cache", torch.is_autocast_cache_enabled, torch.set_autocast_cache_enabled,
                ("torch.set_autocast_cache_enabled",)),
        Setting("autocast_nesting", _autocast_nesting, _set_autocast_nesting,
                ("torch.autocast_increment_nesting", "torch.autocast_decrement_nesting")),
        *[s for device in _AUTOCAST_DEVICES for s in _autocast(device)],
        Setting("default_device", _default_device, _set_default_device, ("torch.set_default_device",)),
        Setting("torch_function_modes", _C._len_torch_function_stack,
                lambda n: _set_stack_length(n, _C._len_torch_function_stack, _C._pop_torch_function_stack),
                ("torch._C._push_on_torch_function_stack",)),
        Setting("torch_dispatch_modes", _C._len_torch_dispatch_stack,
                lambda n: _set_stack_length(n, _C._len_torch_dispatch_stack, _C._pop_torch_dispatch_stack),
                ("torch._C._push_on_torch_dispatch_stack", "torch._C._set_dispatch_mode")),
        Setting("default_dtype", torch.get_default_dtype, torch.set_default_dtype,
                ("torch.set_default_dtype", "torch._C._set_default_dtype", "torch.set_default_tensor_type",
                 "torch._C._set_default_tensor_type")),
        Setting("deterministic_algorithms",
                lambda: (torch.are_deterministic_algorithms_enabled(),
                         torch.is_deterministic_algorithms_warn_only_enabled()),
                _set_deterministic,
                ("torch.use_deterministic_algorithms", "torch._C._set_deterministic_algorithms",
                 "torch.set_deterministic_debug_mode")),
        # the per-backend precisions first: the legacy getter raises while they disagree
        *_fp32_precisions(),
        Setting("float32_matmul_precision", torch.get_float32_matmul_precision, torch.set_float32_matmul_precision,
                ("torch.set_float32_matmul_precision", "torch._C._set_float32_matmul_precision")),
        Setting("anomaly_mode", lambda: (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
                _set_anomaly, ("torch.set_anomaly_enabled", "torch.autograd.set_detect_anomaly")),
        Setting("num_threads", torch.get_num_threads, torch.set_num_threads, ("torch.set_num_threads",)),
        Setting("mha_fastpath", torch.backends.mha.get_fastpath_enabled, torch.backends.mha.set_fastpath_enabled,
                ("torch.backends.mha.set_fastpath_enabled",)),
        Setting("opt_einsum", _opt_einsum, _set_opt_einsum,
                ("torch.backends.opt_einsum.enabled", "torch.backends.opt_einsum.strategy")),
        Setting("print_options", _print_options, _set_print_options, ("torch.set_printoptions",)),
        _distribution_validation(),
        Setting("torch_rng", torch.random.get_rng_state, torch.random.set_rng_state,
                ("torch.set_rng_state", "torch.manual_seed", "torch.seed", "torch.random.set_rng_state"), rng=True),
        Setting("python_rng", random.getstate, random.setstate, ("random.setstate", "random.seed"), rng=True),
        Setting("warnings", _warnings_state, _set_warnings_state,
                ("warnings.filterwarnings", "warnings.simplefilter", "warnings.resetwarnings")),
        Setting("recursion_limit", sys.getrecursionlimit, sys.setrecursionlimit, ("sys.setrecursionlimit",)),
        Setting("switch_interval", sys.getswitchinterval, sys.setswitchinterval, ("sys.setswitchinterval",)),
        Setting("int_max_str_digits", sys.get_int_max_str_digits, sys.set_int_max_str_digits,
                ("sys.set_int_max_str_digits",)),
        Setting("trace", sys.gettrace, sys.settrace, ("sys.settrace",)),
        Setting("profile", sys.getprofile, sys.setprofile, ("sys.setprofile",)),
        Setting("environ", _environ, _set_environ, ("os.environ", "os.putenv")),
    ]
    if torch.cuda.is_available():
        settings.append(Setting("cuda_rng", torch.cuda.get_rng_state_all, torch.cuda.set_rng_state_all,
                                ("torch.cuda.set_rng_state_all", "torch.cuda.manual_seed_all"), rng=True))
    return settings


SETTINGS: list[Setting] = _settings()

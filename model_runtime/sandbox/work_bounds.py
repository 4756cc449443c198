"""Bounds on the work one torch op may do in a request, enforced by the native guard's kernels.

    with request_budget(current_stop()):   # on the request thread, inside its task
        ...

A thread inside one long kernel runs no Python: neither the request's cooperative stop nor the
asynchronous exception reaches it, and after the grace period the replica would count as wedged
and be replaced. So, while a request runs (native guard only, `native/work_bounds.h`):

* **The stop reaches C++.** The request's stop also sets its budget's flag; every kernel of the
  guard's key (the ~1,500 writing or allocating ops and the priced ones below) raises
  `RequestTimeout` before running once it is set, so a composite op that loops over aten calls in
  C++ (`matrix_power`, `einsum`, a decomposed attention) ends at its next call.
* **Heavy ops are priced before they run.** The op families whose cost grows faster than the
  memory they touch (`COSTS`: matrix products, every convolution entry, fused attention, cubic
  linear algebra, pooling windows) get their floating-point operations from the argument sizes;
  views whose logical size memory does not bound (`expand`, `as_strided`, `unfold`, `set_` with a
  size) get their element count after they are made; the n log n families (`sort` and what
  decomposes into it: `argsort`, `msort`, `quantile`; `topk`, `kthvalue`, `median`, `mode`,
  `unique`, every FFT) get their compare steps, elements x log2 of the length sorted or
  transformed. An op that cannot finish in the time the
  request has left (up to `timeout + grace/2`) at the replica's rate is refused with
  `LimitExceeded` naming its size and the rate. The CPU rates are measured once per process
  (`measure_rates`: the best of a few short float32/float64/bfloat16/float16/int64 products, the
  slowest of a few reductions over a stride-0 view, and the slowest of a few sorts and a
  prime-length FFT in steps/s), and ops are priced at half those rates;
  tensors on an accelerator are priced at fixed caps above any current
  device's peak (`DEVICE_FLOPS`, `DEVICE_ELEMENTS`, `DEVICE_STEPS`), so only what no device could finish in time
  is refused there.

The ops that fall through the guard's key today stay kernel-free (no cost): only the families in
`COSTS` gain a kernel.
"""

from __future__ import annotations

import contextlib
import enum
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

from model_runtime.replica.request_thread import StopSignal
from model_runtime.sandbox.errors import RequestTimeout

# What a request's stop raises: the sandbox worker's cancel, the runtime's request threads' cancel.
STOP_TYPES: tuple[type[BaseException], ...] = (RequestTimeout, SystemExit)


class Cost(enum.IntEnum):
    """How an op is priced (mirrors `work_bounds::Cost`)."""

    NONE = 0
    MATMUL = 1  # A (..., n, k) @ B (..., k, m): 2 * numel(A) * m
    CONV = 2  # 2 * batch * output positions * numel(weight) (input positions when transposed)
    ATTENTION = 3  # 2 * query rows * keys * (E + Ev)
    CUBIC = 4  # A (..., m, n): numel(A) * min(m, n)
    POOL = 5  # output positions * window size
    VIEW = 6  # elements of the view made (after it is made)
    PAIRWISE = 7  # x1 (..., P, M), x2 (..., R, M): 2 * numel(x1) * R
    CHAIN = 8  # a product chain's order search: n**3 steps for n operands
    RECURRENT = 9  # steps * (2 * weights + a fixed cost per step)
    NLOGN = 10  # numel * log2(length along `dim`, or of the dims transformed, or numel): compare steps


# aten op names (all overloads, out= variants included). Composite ops (`matmul`, `linear`,
# `einsum`, `conv2d`, `scaled_dot_product_attention`'s math path, `matrix_power`, `cdist`'s
# matmul path) decompose into these at the dispatcher, so pricing the bottom ops prices them.
_FAMILIES: dict[Cost, tuple[str, ...]] = {
    Cost.MATMUL: ("mm", "bmm", "addmm", "baddbmm", "addbmm", "_addmm_activation", "_int_mm", "_scaled_mm"),
    Cost.CONV: (
        "convolution", "_convolution", "convolution_overrideable", "mkldnn_convolution", "cudnn_convolution",
        "cudnn_convolution_transpose", "miopen_convolution", "miopen_convolution_transpose",
        "miopen_depthwise_convolution", "_slow_conv2d_forward", "slow_conv3d_forward", "_conv_depthwise2d",
        "conv_depthwise3d", "slow_conv_dilated2d", "slow_conv_dilated3d", "slow_conv_transpose2d",
        "slow_conv_transpose3d", "_nnpack_spatial_convolution",
    ),
    Cost.ATTENTION: (
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable", "_flash_attention_forward",
        "_efficient_attention_forward",
    ),
    Cost.CUBIC: (
        "_linalg_eigh", "linalg_eig", "_linalg_eigvals", "linalg_eigvals", "_linalg_svd", "linalg_qr",
        "_linalg_solve_ex", "linalg_lu_factor_ex", "linalg_lu", "linalg_inv_ex", "_linalg_det", "_linalg_slogdet",
        "linalg_cholesky_ex", "linalg_householder_product", "linalg_solve_triangular", "triangular_solve",
        "linalg_lstsq", "linalg_matrix_exp", "cholesky_solve", "cholesky_inverse", "ormqr", "geqrf", "lu_solve",
        "linalg_lu_solve", "linalg_ldl_factor_ex", "linalg_ldl_solve",
    ),
    Cost.POOL: (
        "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
        "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d", "mkldnn_max_pool2d",
        "mkldnn_max_pool3d", "quantized_max_pool1d", "quantized_max_pool2d", "quantized_max_pool3d",
    ),
    Cost.VIEW: ("expand", "as_strided", "as_strided_", "unfold", "set_", "_reshape_alias"),
    Cost.PAIRWISE: ("_cdist_forward",),
    Cost.CHAIN: ("linalg_multi_dot", "chain_matmul"),
    Cost.RECURRENT: ("lstm", "gru", "rnn_tanh", "rnn_relu", "mkldnn_rnn", "_cudnn_rnn", "miopen_rnn"),
    # Selection (kthvalue, median) is linear on average: priced as a sort, an upper bound.
    # `unique_consecutive` and `searchsorted` are linear (or m log n) in memory: not priced.
    Cost.NLOGN: (
        "sort", "topk", "kthvalue", "median", "nanmedian", "mode", "_unique", "_unique2", "unique_dim",
        "_fft_r2c", "_fft_c2r", "_fft_c2c",
    ),
}
COSTS: dict[str, int] = {name: int(kind) for kind, names in _FAMILIES.items() for name in names}

# Accelerator tensors: caps above any current device's dense peak (about 2.3 PFLOP/s of bf16 and
# 8 TB/s of memory for the largest), so only what no device could finish in time is refused.
DEVICE_FLOPS = 5e15
DEVICE_ELEMENTS = 4e12
DEVICE_STEPS = 1e13  # n log n steps/s: a GPU radix sort of 2**30 keys takes ~0.1 s (~3e11 steps/s)

SAFETY = 2.0  # CPU ops are priced at the measured rates divided by this
_MEASURED_DTYPES = ("float32", "float64", "bfloat16", "float16", "int64")
_lock = threading.Lock()
_rates: dict[str, Any] | None = None


def measure_rates() -> dict[str, Any]:
    """This process's CPU rates (measured once; ~0.1 s): float ops/s of a matrix product by
    dtype name as the dispatcher spells it, and elements/s of a float32 reduction."""
    global _rates
    with _lock:
        if _rates is None:
            _rates = _measure()
        return _rates


def _measure() -> dict[str, Any]:
    import torch

    flops: dict[str, float] = {}
    with torch.no_grad():
        for name in _MEASURED_DTYPES:
            dtype = getattr(torch, name)
            n = 192 if dtype.is_floating_point else 96
            a = torch.ones(n, n, dtype=dtype)
            flops[_scalar_type_name(dtype)] = 2.0 * n**3 / _best_seconds(lambda a=a: torch.mm(a, a))
        # The slowest of a few reductions over a stride-0 view (what a view larger than its memory
        # is read by; their speeds differ a hundredfold)
        view = torch.ones(1).expand(512, 512)
        elements = min(float(view.numel()) / _best_seconds(lambda r=r: r(view), repeats=3)
                       for r in (torch.sum, torch.amax, torch.prod, torch.var))
        steps = _steps_rate(torch)
    # Priced at half the measured rates: a kernel path slower than the measured one keeps inside
    # the grace period.
    return {"cpu_flops": {k: v / SAFETY for k, v in flops.items()}, "cpu_elements": elements / SAFETY,
            "cpu_steps": steps / SAFETY, "device_flops": DEVICE_FLOPS, "device_elements": DEVICE_ELEMENTS,
            "device_steps": DEVICE_STEPS}


def _steps_rate(torch: Any) -> float:
    """n log2 n steps/s of the slowest of a few sorts and FFTs (float16 sorts are the slowest on
    x86, ~2x float32's and ~20x int64's; a prime length is an FFT's slowest): every n log n op
    is priced at this one rate."""
    n = 2**13
    values = torch.rand(n)
    halves = values.half()
    runs = (lambda: torch.sort(halves), lambda: torch.sort(values, stable=True),
            lambda: torch.fft.fft(values[: n - 1]))  # 8191 is prime
    return min(n * math.log2(n) / _best_seconds(run, repeats=3) for run in runs)


def _best_seconds(fn: Any, repeats: int = 8) -> float:
    for _ in range(3):  # warm: first-call set-up, page faults, the BLAS threads starting
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9)


def _scalar_type_name(dtype: Any) -> str:
    import torch

    return {torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16",
            torch.float16: "Half", torch.int64: "Long"}[dtype]


def install(native: Any) -> None:
    """Give the loaded extension this process's rates (once, before the first request)."""
    rates = measure_rates()
    native.set_rates(rates["cpu_flops"], rates["cpu_elements"], rates["device_flops"], rates["device_elements"],
                     rates["cpu_steps"], rates["device_steps"])


@contextlib.contextmanager
def request_budget(stop: StopSignal) -> Iterator[Any]:
    """Bind the budget of the request whose stop is `stop` to this thread for the block: until
    the point its stop is forced (`stop.forced_at`), and stopped when `stop` fires. Nothing is
    bound for a task without a time limit, or when the native guard is unavailable (the Python
    dispatch mode neither stops nor prices ops)."""
    from model_runtime.sandbox import native_guard

    native = native_guard.load() if stop.forced_at != float("inf") else None
    if native is None or stop.cancel not in STOP_TYPES:
        yield None
        return
    budget = native.Budget(stop.forced_at - time.monotonic(), STOP_TYPES.index(stop.cancel))
    stop.also_stop(budget.stop)
    previous = native.bind_budget(budget)
    try:
        yield budget
    finally:
        native.bind_budget(previous)

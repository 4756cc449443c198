"""Bounds on the work one torch op may do in a request, enforced by the write guard.

    with request_budget(current_stop()):   # on the request thread, inside its task
        ...

A thread inside one long kernel runs no Python: neither the request's cooperative stop nor the
asynchronous exception reaches it, and after the grace period the replica would count as wedged
and be replaced. So, while a request runs (the native guard's kernels, `native/work_bounds.h`;
the Python fallback guard applies the same table, formulas, rates and messages, below):

* **The stop reaches C++.** The request's stop also sets its budget's flag; every kernel of the
  guard's key (the ~1,500 writing or allocating ops and the priced ones below) raises
  `RequestTimeout` before running once it is set, so a composite op that loops over aten calls in
  C++ (`matrix_power`, `einsum`, a decomposed attention) ends at its next call.
* **Heavy ops are priced before they run.** The op families whose cost grows faster than the
  memory they touch (`COSTS`: matrix products, every convolution entry, fused attention, cubic
  linear algebra, pooling windows, kernels that multiply inside one call such as `_trilinear` and
  `_transformer_encoder_layer_fwd`) get their floating-point operations from the argument sizes;
  embedding bags, `pdist` and multilabel margin loss the elements they read;
  views whose logical size memory does not bound (`expand`, `as_strided`, `unfold`, `set_` with a
  size) get their element count after they are made; the n log n families (`sort` and what
  decomposes into it: `argsort`, `msort`, `quantile`; `topk`, `kthvalue`, `median`, `mode`,
  `unique`, every FFT) get their compare steps, elements x log2 of the length sorted or
  transformed. An op that cannot finish in the time the
  request has left (up to `timeout + grace/2`) at the replica's rate is refused with
  `LimitExceeded` naming its size and the rate. The CPU rates are measured once per process
  (`measure_rates`: the best of a few short float32/float64/bfloat16/float16/int64 products, the
  slowest of a symmetric eigendecomposition and an SVD for cubic linear algebra, the slowest of a
  few reductions over a stride-0 view (also the rate of pooling windows, bags and pairs, priced in
  elements read), and the slowest of a few sorts, integer ones along an outer dimension included,
  and a prime-length FFT in steps/s), and ops are priced at half those rates;
  tensors on an accelerator are priced at fixed caps above any current
  device's peak (`DEVICE_FLOPS`, `DEVICE_ELEMENTS`, `DEVICE_STEPS`), so only what no device could finish in time
  is refused there.

The ops that fall through the guard's key today stay kernel-free (no cost): only the families in
`COSTS` gain a kernel.

When the native guard is unavailable, requests run under `dispatch_guard.PythonWriteGuard` (a
dispatch mode) and `request_budget` binds a Python `Budget` instead: every op the mode sees raises
the stop once it was set (same message), and the ops named in `COSTS` are priced by `check_op` /
`check_view` with the same formulas and rates (same `LimitExceeded` text). The mode sees ops below
autograd, after composite decomposition (it decomposes a composite op that reaches it whole, in
inference mode), and not the aten calls kernels make: a composite op is priced through what it
decomposes into (`einsum` through `bmm`), `lstm`, `cdist` and `MultiheadAttention`'s fast path
through the kernels they reach (`mkldnn_rnn_layer`, `_euclidean_dist`,
`_native_multi_head_attention`, in `COSTS`), and a loop of aten calls in C++ ends at its next
call. What it cannot see is C++ work between aten calls of a composite op:
`linalg_multi_dot`'s order search (cubic in the number of operands); such a call ends only when
it returns. Kernels it sees whole that multiply inside are in `COSTS` (priced whole).
"""

from __future__ import annotations

import enum
import math
import threading
import time
from typing import Any

from model_runtime.replica.request_thread import StopSignal
from model_runtime.sandbox.errors import LimitExceeded, RequestTimeout

# What a request's stop raises: the sandbox worker's cancel, the runtime's request threads' cancel.
STOP_TYPES: tuple[type[BaseException], ...] = (RequestTimeout, SystemExit)


class Cost(enum.IntEnum):
    """How an op is priced (mirrors `work_bounds::Cost`)."""

    NONE = 0
    MATMUL = 1  # A (..., n, k) @ B (..., k, m): 2 * numel(A) * m
    CONV = 2  # 2 * batch * output positions * numel(weight) (input positions when transposed)
    ATTENTION = 3  # 2 * query rows * keys * (E + Ev)
    CUBIC = 4  # A (..., m, n): numel(A) * min(m, n)
    POOL = 5  # output positions * window size, in elements read
    VIEW = 6  # elements of the view made (after it is made)
    PAIRWISE = 7  # x1 (..., P, M), x2 (..., R, M): 2 * numel(x1) * R
    CHAIN = 8  # a product chain's order search: n**3 steps for n operands
    RECURRENT = 9  # steps * (2 * weights + a fixed cost per step)
    NLOGN = 10  # numel * log2(length along `dim`, or of the dims transformed, or numel): compare steps
    LINEAR = 11  # x (..., k) by W (m, k, ...): 2 * numel(x) * m (`out_features` when W is packed)
    TRILINEAR = 12  # i1, i2, i3 over one index space (`bilinear`): 2 * its size
    ENCODER = 13  # a fused encoder layer: 2 * rows * its weights + attention (4 * rows * L * E)
    BAG = 14  # embedding bags: numel(indices) * weight columns, in elements read
    ROW_PAIRS = 15  # every pair of rows (`pdist`): numel(x) * rows / 2, in elements read
    LABEL_PAIRS = 16  # every (target, class) pair per row (multilabel margin): numel(x) * columns, elements


# aten op names (all overloads, out= variants included). Composite ops (`matmul`, `linear`,
# `einsum`, `conv2d`, `scaled_dot_product_attention`'s math path, `matrix_power`, `cdist`'s
# matmul path) decompose into these at the dispatcher, so pricing the bottom ops prices them.
_FAMILIES: dict[Cost, tuple[str, ...]] = {
    Cost.MATMUL: (
        "mm", "bmm", "addmm", "baddbmm", "addbmm", "addmm_", "baddbmm_", "addbmm_", "_addmm_activation", "_int_mm",
        "_scaled_mm", "_scaled_mm_v2", "_grouped_mm", "_scaled_grouped_mm", "_scaled_grouped_mm_v2",
        "_sparse_addmm", "sspaddmm", "_sparse_sparse_matmul", "hspmm", "_sparse_semi_structured_mm",
        "_sparse_semi_structured_addmm", "_sparse_mm_reduce_impl", "sparse_sampled_addmm",
    ),
    Cost.CONV: (
        "convolution", "_convolution", "convolution_overrideable", "mkldnn_convolution", "cudnn_convolution",
        "cudnn_convolution_transpose", "miopen_convolution", "miopen_convolution_transpose",
        "miopen_depthwise_convolution", "_slow_conv2d_forward", "slow_conv3d_forward", "_conv_depthwise2d",
        "conv_depthwise3d", "slow_conv_dilated2d", "slow_conv_dilated3d", "slow_conv_transpose2d",
        "slow_conv_transpose3d", "_nnpack_spatial_convolution", "cudnn_convolution_relu",
        "cudnn_convolution_add_relu", "_mps_convolution", "_mps_convolution_transpose", "conv_tbc",
        "miopen_convolution_relu", "miopen_convolution_add_relu",
    ),
    Cost.ATTENTION: (
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable", "_flash_attention_forward",
        "_efficient_attention_forward", "_native_multi_head_attention", "_cudnn_attention_forward",
        "_flash_attention_forward_no_dropout_inplace", "_scaled_dot_product_attention_math_for_mps",
        "_triton_scaled_dot_attention", "_triton_multi_head_attention",
    ),
    Cost.CUBIC: (
        "_linalg_eigh", "linalg_eig", "_linalg_eigvals", "linalg_eigvals", "_linalg_svd", "linalg_qr",
        "_linalg_solve_ex", "linalg_lu_factor_ex", "linalg_lu", "linalg_inv_ex", "_linalg_det", "_linalg_slogdet",
        "linalg_cholesky_ex", "linalg_householder_product", "linalg_solve_triangular", "triangular_solve",
        "linalg_lstsq", "linalg_matrix_exp", "cholesky_solve", "cholesky_inverse", "ormqr", "geqrf", "lu_solve",
        "linalg_lu_solve", "linalg_ldl_factor_ex", "linalg_ldl_solve", "cholesky", "linalg_pinv",
    ),
    Cost.POOL: (
        "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
        "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d", "mkldnn_max_pool2d",
        "mkldnn_max_pool3d", "quantized_max_pool1d", "quantized_max_pool2d", "quantized_max_pool3d",
        "fractional_max_pool2d", "fractional_max_pool3d",
    ),
    Cost.VIEW: ("expand", "as_strided", "as_strided_", "unfold", "set_", "_reshape_alias"),
    Cost.PAIRWISE: ("_cdist_forward", "_euclidean_dist"),
    Cost.CHAIN: ("linalg_multi_dot", "chain_matmul"),
    # `mkldnn_rnn_layer` (one layer of a CPU LSTM over its whole sequence), `_euclidean_dist`
    # (`cdist`'s product path) and `_native_multi_head_attention` (`MultiheadAttention`'s inference
    # fast path; its projections are not counted) are what the Python fallback guard sees of
    # `lstm`, `cdist` and attention: their kernels' own aten calls run below its dispatch mode.
    Cost.RECURRENT: (
        "lstm", "gru", "rnn_tanh", "rnn_relu", "mkldnn_rnn", "mkldnn_rnn_layer", "_cudnn_rnn", "miopen_rnn",
    ),
    # Selection (kthvalue, median) is linear on average: priced as a sort, an upper bound.
    # `unique_consecutive` and `searchsorted` are linear (or m log n) in memory: not priced.
    Cost.NLOGN: (
        "sort", "topk", "kthvalue", "median", "nanmedian", "mode", "_unique", "_unique2", "unique_dim",
        "_fft_r2c", "_fft_c2r", "_fft_c2c",
    ),
    # Kernels that multiply inside one call: the Python fallback guard sees them whole (the native
    # key also sees their inner products, but a price refuses them before they start).
    # `linear.out` only: `linear` decomposes above both guards, its `out=` form (`F.linear(..., out=y)`)
    # is one kernel.
    Cost.LINEAR: (
        "linear.out", "_sparse_semi_structured_linear", "mkldnn_linear", "_compute_linear_combination",
        "_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu", "_dyn_quant_matmul_4bit",
    ),
    Cost.TRILINEAR: ("_trilinear",),
    Cost.ENCODER: ("_transformer_encoder_layer_fwd",),
    Cost.BAG: ("_embedding_bag", "_embedding_bag_forward_only"),
    Cost.ROW_PAIRS: ("_pdist_forward",),
    Cost.LABEL_PAIRS: ("multilabel_margin_loss_forward",),
}
# Kinds priced in elements read (at the reduction rate) or in n log n steps; the others in float ops.
# Pooling windows are compare or add loops (0.2-4 G window elements/s on one x86 core, far below a
# product's rate).
ELEMENT_KINDS = frozenset({Cost.VIEW, Cost.CHAIN, Cost.BAG, Cost.ROW_PAIRS, Cost.LABEL_PAIRS, Cost.POOL})
# By op name (all its overloads), or "name.overload" for one overload.
COSTS: dict[str, int] = {name: int(kind) for kind, names in _FAMILIES.items() for name in names}


def cost_kind(name: str, overload: str) -> int:
    """How the op `aten::name` (overload `overload`, "" for the default) is priced; 0: not."""
    return COSTS.get(f"{name}.{overload}", COSTS.get(name, 0))

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
        cubic = _cubic_rate(torch)
    # Priced at half the measured rates: a kernel path slower than the measured one keeps inside
    # the grace period.
    return {"cpu_flops": {k: v / SAFETY for k, v in flops.items()}, "cpu_elements": elements / SAFETY,
            "cpu_steps": steps / SAFETY, "cpu_cubic": cubic / SAFETY, "device_flops": DEVICE_FLOPS,
            "device_elements": DEVICE_ELEMENTS, "device_steps": DEVICE_STEPS}


def _cubic_rate(torch: Any) -> float:
    """numel x min(m, n) per second (the CUBIC price's unit) of the slowest of a symmetric
    eigendecomposition and an SVD: factorisations run 20-50x below a product's rate on x86."""
    n = 128
    a = torch.rand(n, n, dtype=torch.float64)
    symmetric = a + a.T
    single = a.float()
    runs = (lambda: torch.linalg.eigh(symmetric), lambda: torch.linalg.svd(single))
    return min(float(n**3) / _best_seconds(run, repeats=3) for run in runs)


def _steps_rate(torch: Any) -> float:
    """n log2 n steps/s of the slowest of a few sorts and FFTs: every n log n op, of any dtype,
    is priced at this one rate. Along the last dimension float16 sorts are the slowest (~0.8x
    float32's; int64's and int32's ~1.3x float32's); along an outer dimension int64 sorts are the
    slowest of all (~0.6x float16's at 2**16 elements), so an integer sort is not priced higher
    than a float one. A prime length is an FFT's slowest."""
    n = 2**13
    values = torch.rand(n)
    halves = values.half()
    columns = (torch.rand(2**16) * 2**29).long().view(2**7, 2**9)
    steps = n * math.log2(n)
    runs = ((steps, lambda: torch.sort(halves)), (steps, lambda: torch.sort(values, stable=True)),
            (steps, lambda: torch.fft.fft(values[: n - 1])),  # 8191 is prime
            (columns.numel() * math.log2(columns.size(0)), lambda: torch.sort(columns, dim=0)))
    return min(work / _best_seconds(run, repeats=3) for work, run in runs)


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
                     rates["cpu_steps"], rates["device_steps"], rates["cpu_cubic"])


class request_budget:
    """Bind the budget of the request whose stop is `stop` to this thread for the block: until
    the point its stop is forced (`stop.forced_at`), and stopped when `stop` fires. Nothing is
    bound for a task without a time limit. The native guard's kernels read a `native.Budget`;
    when the native guard is unavailable, the Python dispatch mode reads a `Budget` (same rules,
    `check_op`). (A class rather than a generator context manager: entered on every request.)"""

    __slots__ = ("_bound", "_native", "_previous", "stop")

    def __init__(self, stop: StopSignal) -> None:
        self.stop = stop
        self._bound = False  # whether __enter__ bound a budget (then __exit__ puts back `_previous`)
        self._native: Any = None  # the native guard, when it bound a `native.Budget`
        self._previous: Any = None

    def __enter__(self) -> Any:
        from model_runtime.sandbox import native_guard

        stop = self.stop
        if stop.forced_at == float("inf") or stop.cancel not in STOP_TYPES:
            return None
        native = native_guard.load()
        if native is None:
            measure_rates()  # before the budget is bound: the measurement's own ops are not priced
            budget = Budget(stop.forced_at - time.monotonic(), stop.cancel)
            stop.also_stop(budget.stop)
            self._previous, BOUND.budget = BOUND.budget, budget
            self._bound = True
            return budget
        native_budget = native.Budget(stop.forced_at - time.monotonic(), STOP_TYPES.index(stop.cancel))
        stop.also_stop(native_budget.stop)
        self._native = native
        self._previous = native.bind_budget(native_budget)
        self._bound = True
        return native_budget

    def __exit__(self, *_exc: object) -> None:
        if not self._bound:
            return
        if self._native is not None:
            self._native.bind_budget(self._previous)
        else:
            BOUND.budget = self._previous


# --- the same bounds for the Python fallback guard (`dispatch_guard.PythonWriteGuard`) ----------
#
# The same table (`COSTS`), formulas, rates and messages as `native/work_bounds.h`, applied by the
# dispatch mode to the ops it sees: below autograd, after composite decomposition. A composite op
# is priced through the ops it decomposes into (`lstm` through `mkldnn_rnn_layer`, `einsum` through
# `bmm`); what a composite op does in C++ between aten calls is not seen (`linalg_multi_dot`'s
# order search), nor are the ops kernels call below the mode.


class Budget:
    """A request's budget as the Python fallback guard reads it (the native guard's is
    `native.Budget`): the point past which no op may be expected to run, and its stop."""

    __slots__ = ("cancel", "limit_at", "stopped")

    def __init__(self, seconds_left: float, cancel: type[BaseException]) -> None:
        self.limit_at = time.monotonic() + seconds_left
        self.cancel = cancel
        self.stopped = False

    def stop(self) -> None:
        """The request's stop: every op its thread dispatches raises from now on."""
        self.stopped = True

    def seconds_left(self) -> float:
        return self.limit_at - time.monotonic()


class _Bound(threading.local):
    budget: Budget | None = None  # the request's budget on this thread (Python fallback guard)


BOUND = _Bound()
# (stops raised, ops over budget) by the Python fallback guard since the process started.
PYTHON_COUNTERS = [0, 0]
STEP_FLOPS = 1e5  # a recurrent step's fixed cost in float-op equivalents (`kStepFlops`)
_NAME_OF_DTYPE: dict[Any, str] = {}


def raise_stop(budget: Budget, op: str) -> None:
    PYTHON_COUNTERS[0] += 1
    raise budget.cancel(f"the request ran past its time limit and was stopped (at {op})")


def check_op(budget: Budget, kind: int, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Before a priced op (not a view) runs under the Python guard: its stop, then its price."""
    if budget.stopped:
        raise_stop(budget, func._opname)
    if kind != Cost.VIEW:
        global _TENSOR
        if _TENSOR is None:
            import torch

            _TENSOR = torch.Tensor
        values = _Arguments(func, args, kwargs)
        _check_price(budget, kind, func._opname, cost_of(kind, values), values.placement())


def check_view(budget: Budget, op: str, view: Any) -> None:
    """After a view op: the logical size of what it made, which memory does not bound."""
    import torch

    if not isinstance(view, torch.Tensor):
        return
    elements = float(view.numel())
    try:
        memory = view.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        memory = 0  # no plain storage of its own: priced, as the native kernels do
    if elements * view.element_size() <= memory:
        return
    _check_price(budget, Cost.VIEW, op, elements, (view.device.type == "cpu", view.dtype))


class _Arguments:
    """An op call's arguments by schema name, defaults filled in (as the native kernels see them)."""

    __slots__ = ("args", "kwargs", "names", "schema")

    def __init__(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.schema = func._schema
        self.args = args
        self.kwargs = kwargs
        names = _NAMES.get(func)
        if names is None:
            names = _NAMES[func] = {a.name: (i, a.default_value) for i, a in enumerate(self.schema.arguments)}
        self.names = names

    def get(self, name: str) -> Any:
        entry = self.names.get(name)
        if entry is None:
            return None
        i, default = entry
        return self.args[i] if i < len(self.args) else self.kwargs.get(name, default)

    def tensor(self, *names: str) -> Any:
        for name in names:
            value = self.get(name)
            if isinstance(value, _TENSOR):
                return value
        return None

    def ints(self, name: str) -> list[int]:
        value = self.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return [value]
        return [int(v) for v in value] if isinstance(value, (list, tuple)) else []

    def values(self) -> list[Any]:
        return [self.get(a.name) for a in self.schema.arguments]

    def placement(self) -> tuple[bool, Any]:
        """The first tensor argument's (is on the CPU, dtype): what the kernel is chosen by."""
        import torch

        for value in (*self.args, *self.kwargs.values()):
            if isinstance(value, torch.Tensor):
                return value.device.type == "cpu", value.dtype
        return True, torch.float32


_NAMES: dict[Any, dict[str, tuple[int, Any]]] = {}  # per op: argument name -> (position, default)
_TENSOR: Any = None  # torch.Tensor, once the Python guard prices its first op


def _at_or(values: list[int], i: int, fallback: int) -> int:
    return values[min(i, len(values) - 1)] if values else fallback


def _window_out(size: int, kernel: int, stride: int, padding: int, dilation: int) -> float:
    span = dilation * (kernel - 1) + 1
    room = size + 2 * padding - span
    return 0.0 if room < 0 else math.floor(room / max(stride, 1)) + 1


def cost_of(kind: int, a: _Arguments) -> float:
    """Floating-point operations (compare steps for NLOGN, elements for CHAIN) the op is about to
    do; 0 when unknown. The formulas of `work_bounds::cost_of`."""
    if kind == Cost.MATMUL:
        left, right = a.tensor("mat1", "batch1", "self"), a.tensor("mat2", "batch2", "other")
        return 0.0 if left is None or right is None or right.dim() < 1 else 2.0 * left.numel() * right.size(-1)
    if kind == Cost.CONV:
        return _conv_cost(a)
    if kind == Cost.ATTENTION:
        q, k, v = a.tensor("query", "q"), a.tensor("key", "k"), a.tensor("value", "v")
        if q is None or k is None or v is None or q.dim() < 2 or k.dim() < 2 or v.dim() < 1:
            return 0.0
        rows = q.numel() / max(q.size(-1), 1)
        keys = max(k.size(-2), k.size(-3) if k.dim() >= 3 else 1)
        return float(2.0 * rows * keys * (q.size(-1) + v.size(-1)))
    if kind == Cost.CUBIC:
        m = a.tensor("self", "A", "input", "LU", "B")
        return 0.0 if m is None or m.dim() < 2 else float(m.numel()) * min(m.size(-1), m.size(-2))
    if kind == Cost.POOL:
        return _pool_cost(a)
    if kind == Cost.PAIRWISE:
        x1, x2 = a.tensor("x1"), a.tensor("x2")
        return 0.0 if x1 is None or x2 is None or x2.dim() < 2 else 2.0 * x1.numel() * x2.size(-2)
    if kind == Cost.CHAIN:
        tensors = a.get("tensors")
        return float(len(tensors)) ** 3 if isinstance(tensors, (list, tuple)) else 0.0
    if kind == Cost.RECURRENT:
        return _recurrent_cost(a)
    if kind == Cost.NLOGN:
        return _nlogn_cost(a)
    if kind == Cost.LINEAR:
        x, w = a.tensor("input", "self", "inp"), a.tensor("weight", "coefficients", "mat2", "packed_weights")
        if x is None or w is None:
            return 0.0
        rows = a.get("out_features")
        if not isinstance(rows, int) or isinstance(rows, bool):
            rows = w.size(0) if w.dim() >= 2 else 1
        return float(2.0 * x.numel() * rows)
    if kind == Cost.TRILINEAR:
        return _trilinear_cost(a)
    if kind == Cost.ENCODER:
        return _encoder_cost(a)
    if kind == Cost.BAG:
        w, indices = a.tensor("weight"), a.tensor("indices")
        return 0.0 if w is None or indices is None or w.dim() < 1 else float(indices.numel() * w.size(-1))
    if kind in (Cost.ROW_PAIRS, Cost.LABEL_PAIRS):
        x = a.tensor("self")
        if x is None or x.dim() < 1:
            return 0.0
        if kind == Cost.LABEL_PAIRS:
            return float(x.numel() * x.size(-1))
        return 0.0 if x.dim() < 2 else float(x.numel() * x.size(-2) / 2)
    return 0.0


def _trilinear_cost(a: _Arguments) -> float:
    """2 x the size of the index space i1, i2 and i3 span once each is unsqueezed at its
    `expand` dims (each product and sum of the kernel runs over it)."""
    operands = (a.tensor("i1"), a.tensor("i2"), a.tensor("i3"))
    space: list[int] = []
    for t, expand in zip(operands, (a.ints("expand1"), a.ints("expand2"), a.ints("expand3")), strict=True):
        if t is None:
            return 0.0
        sizes = list(t.shape)
        for d in sorted(expand):
            if 0 <= d <= len(sizes):
                sizes.insert(d, 1)
        if len(space) < len(sizes):
            space.extend([1] * (len(sizes) - len(space)))
        space = [max(s, n) for s, n in zip(space, sizes + [1] * (len(space) - len(sizes)), strict=True)]
    return 2.0 * math.prod(space)


def _encoder_cost(a: _Arguments) -> float:
    """A fused encoder layer (`TransformerEncoderLayer`'s inference fast path): every row
    multiplies by the projections' and the feed-forward's weights, and attends to its sequence."""
    src = a.tensor("src")
    if src is None or src.dim() < 2 or src.is_nested:
        return 0.0
    width = max(src.size(-1), 1)
    rows = src.numel() / width
    weights = sum(float(a.get(name).numel()) for name in _ENCODER_WEIGHTS if isinstance(a.get(name), _TENSOR))
    return float(2.0 * rows * weights + 4.0 * rows * src.size(-2) * width)


_ENCODER_WEIGHTS = ("qkv_weight", "proj_weight", "ffn_weight_1", "ffn_weight_2")


def _conv_cost(a: _Arguments) -> float:
    x, weight = a.tensor("input", "self"), a.tensor("weight")
    if x is None or weight is None or weight.dim() < 3 or x.dim() < weight.dim() - 1:
        return 0.0
    spatial = weight.dim() - 2
    transposed = a.get("transposed") is True or "transpose" in a.schema.name
    sizes = list(x.shape)
    if a.schema.name == "aten::conv_tbc":  # input (time, batch, in), weight (width, in, out)
        if x.dim() != 3:
            return 0.0
        pad = a.ints("pad")
        return float(2.0 * _window_out(sizes[0], weight.size(0), 1, _at_or(pad, 0, 0), 1) * sizes[1] * weight.numel())
    first = len(sizes) - spatial
    batch = math.prod(sizes[:first]) / max(sizes[first - 1], 1)
    if transposed:
        positions = float(math.prod(sizes[first:]))
    else:
        stride, padding, dilation = a.ints("stride"), a.ints("padding"), a.ints("dilation")
        positions = 1.0
        for i in range(spatial):
            positions *= _window_out(sizes[first + i], weight.size(2 + i), _at_or(stride, i, 1),
                                     _at_or(padding, i, 0), _at_or(dilation, i, 1))
    return float(2.0 * batch * positions * weight.numel())


def _pool_cost(a: _Arguments) -> float:
    x, kernel = a.tensor("self", "input"), a.ints("kernel_size")
    if x is None or not kernel:
        return 0.0
    spatial = min(len(kernel), x.dim())
    sizes = list(x.shape)
    first = len(sizes) - spatial
    stride, padding, dilation = a.ints("stride"), a.ints("padding"), a.ints("dilation")
    output_size = a.ints("output_size")  # fractional pooling: given
    positions = float(math.prod(sizes[:first]))
    for i in range(spatial):
        k = _at_or(kernel, i, 1)
        if output_size:
            positions *= _at_or(output_size, i, 1) * k
            continue
        positions *= _window_out(sizes[first + i], k, _at_or(stride, i, k), _at_or(padding, i, 0),
                                 _at_or(dilation, i, 1)) * k
    return positions


def _recurrent_cost(a: _Arguments) -> float:
    import torch

    x = a.tensor("input", "data")
    if x is None or x.dim() < 1:
        return 0.0
    weights = 0.0
    for argument, value in zip(a.schema.arguments, a.values(), strict=True):
        if isinstance(value, (list, tuple)):
            weights += sum(t.numel() for t in value if isinstance(t, torch.Tensor))
        elif isinstance(value, torch.Tensor) and argument.name.startswith("weight"):
            weights += value.numel()
    rows = x.numel() / max(x.size(-1), 1)
    return float(rows * (2.0 * weights + STEP_FLOPS))


def _nlogn_cost(a: _Arguments) -> float:
    t = a.tensor("self", "input")
    if t is None or t.numel() < 2:
        return 0.0
    numel = float(t.numel())
    rank = t.dim()

    def length(d: int) -> float:
        d = d + rank if d < 0 else d
        return float(t.size(d)) if 0 <= d < rank else numel

    n = numel
    dim = a.get("dim")
    if isinstance(dim, int) and not isinstance(dim, bool):
        n = length(dim)
    elif isinstance(dim, (list, tuple)) and dim:
        n = min(math.prod(length(int(d)) for d in dim), numel)
    return numel * math.log2(max(n, 2.0))


def _check_price(budget: Budget, kind: int, op: str, work: float, where: tuple[bool, Any]) -> None:
    refusal = over_budget(budget.limit_at - time.monotonic(), _rates or measure_rates(), kind, op, work, where)
    if refusal:
        PYTHON_COUNTERS[1] += 1
        raise LimitExceeded(refusal)


def over_budget(left: float, rates: dict[str, Any], kind: int, op: str, work: float,
                where: tuple[bool, Any]) -> str:
    """The refusal's text when `work` cannot finish in the `left` seconds; empty if it can (the
    text of `work_bounds::over_budget`)."""
    if work <= 0:
        return ""
    cpu, dtype = where
    elements = kind in ELEMENT_KINDS
    steps = kind == Cost.NLOGN
    if steps:
        rate = rates["cpu_steps"] if cpu else rates["device_steps"]
    elif elements:
        rate = rates["cpu_elements"] if cpu else rates["device_elements"]
    elif cpu:  # the measured rate of this dtype; the slowest measured for the others
        by_dtype = rates["cpu_flops"]
        rate = by_dtype.get(_dtype_name(dtype)) or min(by_dtype.values())
        if kind == Cost.CUBIC and rates.get("cpu_cubic", 0) > 0:  # factorisations: far below a product's rate
            rate = min(rate, rates["cpu_cubic"])
    else:
        rate = rates["device_flops"]
    if rate <= 0:
        return ""
    left = max(0.0, left)
    if work <= rate * left:
        return ""
    if steps:
        return (f"{op} needs ~{work / 1e9:.1f} G n log n steps, more than the {left:.1f} s this request has left "
                f"allow at this replica's ~{rate / 1e9:.2f} G steps/s; sort or transform fewer elements (e.g. a "
                "slice, or topk with a smaller input)")
    if elements and kind != Cost.VIEW:
        return (f"{op} reads ~{work / 1e9:.1f} G elements, more than the {left:.1f} s this request has left allow "
                f"at this replica's ~{rate / 1e9:.1f} G elements/s; use smaller operands")
    if elements:
        return (f"{op} makes a view of ~{work / 1e9:.1f} G elements over far less memory; reading it needs more "
                f"than the {left:.1f} s this request has left at this replica's ~{rate / 1e9:.1f} G elements/s "
                "(materialise a smaller tensor instead)")
    return (f"{op} needs ~{work / 1e9:.1f} GFLOP, more than the {left:.1f} s this request has left allow at this "
            f"replica's ~{rate / 1e9:.1f} GFLOP/s; use smaller operands")


def _dtype_name(dtype: Any) -> str | None:
    if not _NAME_OF_DTYPE:
        import torch

        _NAME_OF_DTYPE.update({getattr(torch, name): _scalar_type_name(getattr(torch, name))
                               for name in _MEASURED_DTYPES})
    return _NAME_OF_DTYPE.get(dtype)

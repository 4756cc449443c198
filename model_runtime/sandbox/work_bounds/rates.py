"""The replica's rates: how much work per second an op is priced at.

CPU rates are measured once per process (`measure_rates`, ~0.1 s, before the first request): the
best of a few short float32/float64/bfloat16/float16/int64 products, the slowest of a symmetric
eigendecomposition and an SVD for cubic linear algebra, the slowest of a few reductions over a
stride-0 view (also the rate of pooling windows, bags and pairs, priced in elements read), and the
slowest of a few sorts, integer ones along an outer dimension included, and a prime-length FFT in
steps/s. Ops are priced at half those rates (`SAFETY`). Tensors on an accelerator are priced at
fixed caps above any current device's peak. The native guard receives the rates when it loads
(`install`); the Python fallback guard reads them (`measure_rates`, and `dtype_name` to find a
product's dtype among them).
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

# Accelerator tensors: caps above any current device's dense peak (about 2.3 PFLOP/s of bf16 and
# 8 TB/s of memory for the largest), so only what no device could finish in time is refused.
DEVICE_FLOPS = 5e15
DEVICE_ELEMENTS = 4e12
DEVICE_STEPS = 1e13  # n log n steps/s: a GPU radix sort of 2**30 keys takes ~0.1 s (~3e11 steps/s)

SAFETY = 2.0  # CPU ops are priced at the measured rates divided by this
_MEASURED_DTYPES = ("float32", "float64", "bfloat16", "float16", "int64")
_lock = threading.Lock()
_rates: dict[str, Any] | None = None
_NAME_OF_DTYPE: dict[Any, str] = {}  # torch dtype -> its name in `cpu_flops` (filled on first use)


def measure_rates() -> dict[str, Any]:
    """This process's CPU rates (measured once; ~0.1 s): float ops/s of a matrix product by
    dtype name as the dispatcher spells it, and elements/s of a float32 reduction."""
    global _rates
    with _lock:
        if _rates is None:
            _rates = _measure()
        return _rates


def dtype_name(dtype: Any) -> str | None:
    """The name `cpu_flops` knows a torch dtype by; None for a dtype not measured."""
    if not _NAME_OF_DTYPE:
        import torch

        _NAME_OF_DTYPE.update({getattr(torch, name): _scalar_type_name(getattr(torch, name))
                               for name in _MEASURED_DTYPES})
    return _NAME_OF_DTYPE.get(dtype)
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
        tensors = _tensors_rate(torch)
    # Priced at half the measured rates: a kernel path slower than the measured one keeps inside
    # the grace period.
    return {"cpu_flops": {k: v / SAFETY for k, v in flops.items()}, "cpu_elements": elements / SAFETY,
            "cpu_steps": steps / SAFETY, "cpu_cubic": cubic / SAFETY, "cpu_tensors": tensors / SAFETY,
            "device_flops": DEVICE_FLOPS,
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


# Making many tensors at once runs slower per tensor than the measured 2**13: 0.4-1.2 us each up
# to 2**16, 2.6-4.6 us from 2**17 to 2**20 (their metadata outgrows the caches) on one x86 core.
MANY_TENSORS_SLOWDOWN = 4.0


def _tensors_rate(torch: Any) -> float:
    """Tensors/s an `unbind` makes (the OUTPUTS price's unit), measured at 2**13 pieces and
    divided by `MANY_TENSORS_SLOWDOWN`: what a split into 10**5-10**7 pieces runs at."""
    rows = torch.zeros(2**13, 1)
    return float(rows.size(0)) / _best_seconds(lambda: rows.unbind(0)) / MANY_TENSORS_SLOWDOWN


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
    native.set_rates(rates["cpu_flops"], {k: v for k, v in rates.items() if k != "cpu_flops"})

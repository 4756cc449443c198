"""The replica's rates: how much work per second an op is priced at.

CPU rates are measured once per process (`measure_rates`, ~0.3 s, before the first request): the
best of a few short float32/float64/bfloat16/float16/int64 products, the slowest of a symmetric
eigendecomposition and an SVD for cubic linear algebra, the slowest of a few reductions over a
stride-0 view (also the rate of pooling windows, bags and pairs, priced in elements read), the
slowest of a few sorts, integer ones along an outer dimension included, and a prime-length FFT in
steps/s, and the tensors/s of an `unbind`. Each is the best of three rounds spread in time, timed
in the thread's CPU time (`_best_of_rounds`), so a load spike while they are measured does not
lower them. Ops are priced at half those rates (`SAFETY`). Tensors on an accelerator are priced at
fixed caps above any current device's peak. The native guard receives the rates when it loads
(`install`); the Python fallback guard reads them (`measure_rates`, and `dtype_name` to find a
product's dtype among them)."""

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
    """This process's CPU rates (measured once; ~0.3 s): float ops/s of a matrix product by
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

    with torch.no_grad():
        probes = _probes(torch)
        seconds = _best_of_rounds(probes, torch.get_num_threads() == 1)
    rate = {name: work / seconds[name] for name, (work, _) in probes.items()}
    flops = {_scalar_type_name(getattr(torch, name)): rate[f"mm {name}"] for name in _MEASURED_DTYPES}
    # The slowest of a few reductions over a stride-0 view (what a view larger than its memory is
    # read by; their speeds differ a hundredfold), of a few sorts and FFTs, of two factorisations.
    elements, steps, cubic, narrow = (min(v for k, v in rate.items() if k.startswith(family))
                                      for family in ("reduce", "steps", "cubic", "narrow"))
    # Priced at half the measured rates: a kernel path slower than the measured one keeps inside
    # the grace period.
    return {"cpu_flops": {k: v / SAFETY for k, v in flops.items()}, "cpu_elements": elements / SAFETY,
            "cpu_steps": steps / SAFETY, "cpu_cubic": cubic / SAFETY, "cpu_narrow_conv": narrow / SAFETY,
            "cpu_tensors": rate["tensors"] / MANY_TENSORS_SLOWDOWN / SAFETY,
            "device_flops": DEVICE_FLOPS, "device_elements": DEVICE_ELEMENTS, "device_steps": DEVICE_STEPS}


def _probes(torch: Any) -> dict[str, tuple[float, Any]]:
    """What is timed, by name: (its work in the unit of its price, a call doing it).

    * `mm <dtype>`: float ops of a product per measured dtype;
    * `reduce *`: elements of reductions over a stride-0 view;
    * `cubic *`: numel x min(m, n) of a symmetric eigendecomposition and an SVD (factorisations
      run 20-50x below a product's rate on x86);
    * `steps *`: n log2 n of sorts and a prime-length FFT. Along the last dimension float16 sorts
      are the slowest (~0.8x float32's; int64's and int32's ~1.3x float32's); along an outer
      dimension int64 sorts are the slowest of all (~0.6x float16's at 2**16 elements), so an
      integer sort is not priced higher than a float one; a prime length is an FFT's slowest;
    * `tensors`: the pieces of an `unbind` into 2**13;
    * `narrow *`: float ops of a single-channel 3 x 3 convolution over 512 x 512 and a depthwise
      one over 32 channels of 64 x 64 (3.7-4.7 and ~22 GFLOP/s on one x86 core).
    """
    probes: dict[str, tuple[float, Any]] = {}
    for name in _MEASURED_DTYPES:
        dtype = getattr(torch, name)
        n = 192 if dtype.is_floating_point else 96
        a = torch.ones(n, n, dtype=dtype)
        probes[f"mm {name}"] = (2.0 * n**3, lambda a=a: torch.mm(a, a))
    view = torch.ones(1).expand(512, 512)
    for reduce in (torch.sum, torch.amax, torch.prod, torch.var):
        probes[f"reduce {reduce.__name__}"] = (float(view.numel()), lambda r=reduce: r(view))
    n = 128
    square = torch.rand(n, n, dtype=torch.float64)
    symmetric, single = square + square.T, square.float()
    probes["cubic eigh"] = (float(n**3), lambda: torch.linalg.eigh(symmetric))
    probes["cubic svd"] = (float(n**3), lambda: torch.linalg.svd(single))
    n = 2**13
    values = torch.rand(n)
    halves = values.half()
    columns = (torch.rand(2**16) * 2**29).long().view(2**7, 2**9)
    steps = n * math.log2(n)
    probes["steps sort half"] = (steps, lambda: torch.sort(halves))
    probes["steps sort stable"] = (steps, lambda: torch.sort(values, stable=True))
    probes["steps fft prime"] = (steps, lambda: torch.fft.fft(values[: n - 1]))  # 8191 is prime
    probes["steps sort columns"] = (columns.numel() * math.log2(columns.size(0)), lambda: torch.sort(columns, dim=0))
    image, channels = torch.rand(1, 1, 512, 512), torch.rand(1, 32, 64, 64)
    kernel, depthwise = torch.rand(1, 1, 3, 3), torch.rand(32, 1, 3, 3)
    probes["narrow single"] = (2.0 * 510 * 510 * 9, lambda: torch.nn.functional.conv2d(image, kernel))
    probes["narrow depthwise"] = (2.0 * 62 * 62 * 32 * 9,
                                  lambda: torch.nn.functional.conv2d(channels, depthwise, groups=32))
    rows = torch.zeros(2**13, 1)
    probes["tensors"] = (float(rows.size(0)), lambda: rows.unbind(0))
    return probes


# Best of `ROUNDS` rounds `ROUND_GAP_S` apart, each the best of `REPEATS` calls: a load spike
# during one round does not set the replica's rates for its whole life.
ROUNDS = 3
ROUND_GAP_S = 0.05
REPEATS = 3


def _best_of_rounds(probes: dict[str, tuple[float, Any]], single_thread: bool) -> dict[str, float]:
    """The fewest seconds each probe took, over all rounds. With one torch thread (a replica's
    setting) a call's seconds are its thread's CPU time: the time the kernel computes, not the
    time it waited for a core another process held. (The budget is wall-clock: contention while a
    request runs is what `SAFETY` and the grace period absorb; contention while the rates were
    measured would otherwise lower them for the replica's whole life.) With several torch
    threads the work is spread over threads this one does not time, so wall-clock seconds."""
    clock = _thread_seconds if single_thread else _wall_seconds
    for _, fn in probes.values():  # warm: first-call set-up, page faults, the BLAS threads starting
        for _ in range(2):
            fn()
    best = dict.fromkeys(probes, float("inf"))
    for round_ in range(ROUNDS):
        if round_:
            time.sleep(ROUND_GAP_S)
        for name, (_, fn) in probes.items():
            for _ in range(REPEATS):
                t0 = clock()
                fn()
                best[name] = min(best[name], clock() - t0)
    return {name: max(seconds, 1e-9) for name, seconds in best.items()}


def _thread_seconds() -> float:
    return time.thread_time()


def _wall_seconds() -> float:
    return time.perf_counter()


# Making many tensors at once runs slower per tensor than the measured 2**13: 0.4-1.2 us each up
# to 2**16, 2.6-4.6 us from 2**17 to 2**20 (their metadata outgrows the caches) on one x86 core.
MANY_TENSORS_SLOWDOWN = 4.0


def _scalar_type_name(dtype: Any) -> str:
    import torch

    return {torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16",
            torch.float16: "Half", torch.int64: "Long"}[dtype]


def install(native: Any) -> None:
    """Give the loaded extension this process's rates (once, before the first request)."""
    rates = measure_rates()
    native.set_rates(rates["cpu_flops"], {k: v for k, v in rates.items() if k != "cpu_flops"})

"""What the native write guard adds, per guarded op and per tiny-model forward, in one process.

    .venv/bin/python bench/write_guard.py [rounds]      # default 60 rounds

The guard's key is on (a `WriteGuard` entered, a request budget bound as during a request) or off,
in interleaved batches on the same thread (which goes first alternates); each batch's thread CPU
time is divided by its calls.
Reported per path: the 10th percentile of the batches (the least disturbed by other processes on
a shared machine) and the median. Three levels:

* single ops from Python: the small ops a forward calls most (each reaches the guard's kernel),
  and one plain op (a fallthrough: nothing added);
* the tiny llama's forward (8 tokens, `torch.no_grad`): ~150 guarded calls;
* an nnsight trace of the same forward saving two hidden states and the logits (bench/sandbox.py's
  payload, run locally): the forward plus nnsight's hooks and saves.

The LAST line is the headline: what the guard adds to a tiny forward.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sandbox import _served  # the same offline tiny llama as bench/sandbox.py


def _batch_us(fn: Callable[[], Any], calls: int) -> float:
    c0 = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - c0) / calls * 1e6


def _compare(fn: Callable[[], Any], guarded: Any, rounds: int, calls: int) -> tuple[float, float, float, float]:
    """(off p10, on p10, off median, on median) in microseconds per call."""
    off: list[float] = []
    on: list[float] = []
    for i in range(rounds):
        for guard_on in (i % 2 == 0, i % 2 == 1):  # alternating which goes first
            if guard_on:
                with guarded():
                    on.append(_batch_us(fn, calls))
            else:
                off.append(_batch_us(fn, calls))
    p10 = lambda v: sorted(v)[len(v) // 10]  # noqa: E731
    return p10(off), p10(on), statistics.median(off), statistics.median(on)


def main(rounds: int) -> None:
    import torch

    from model_runtime.sandbox import native_guard
    from model_runtime.sandbox.dispatch_guard import ServerStorage, WriteGuard

    torch.set_num_threads(1)
    native = native_guard.load()
    assert native is not None, native_guard.failure()
    _client, server, _request, _blob = _served(None)
    model = server._module
    guard = WriteGuard(ServerStorage.of_modules([model]))
    budget = native.Budget(3600.0, 0)

    @contextlib.contextmanager
    def guarded() -> Any:
        with guard:
            previous = native.bind_budget(budget)
            try:
                yield
            finally:
                native.bind_budget(previous)

    x, y = torch.randn(8, 64), torch.randn(64, 64)
    ops: dict[str, Callable[[], Any]] = {
        "as_strided (what transpose calls)": lambda: x.t(),
        "empty": lambda: torch.empty(8, 64),
        "mm (priced)": lambda: torch.mm(x, y),
        "copy_ (written)": lambda: x.copy_(x),
        "expand (a priced view)": lambda: x[:1].expand(8, 64),
        "relu (plain: fallthrough)": lambda: torch.relu(x),
    }
    print(f"native write guard, {rounds} interleaved rounds, thread CPU time; p10 (median)")
    for name, op in ops.items():
        off, on, off_m, on_m = _compare(op, guarded, rounds // 4 or 1, 2000)
        print(f"  {name:36s} {1e3 * off:6.0f} -> {1e3 * on:6.0f} ns: +{1e3 * (on - off):4.0f} ns "
              f"(median +{1e3 * (on_m - off_m):.0f} ns)")

    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])

    def forward() -> None:
        with torch.no_grad():
            model(ids)

    def trace() -> None:
        with server.trace(ids):
            server.model.layers[0].output.save()
            server.model.layers[1].mlp.output.save()
            server.lm_head.output.save()

    results = {}
    for name, fn in (("nnsight trace", trace), ("forward", forward)):
        off, on, off_m, on_m = _compare(fn, guarded, rounds, 10)
        results[name] = (off, on)
        print(f"  {name:36s} {off:6.0f} -> {on:6.0f} us: +{on - off:.0f} us (median +{on_m - off_m:.0f} us)")
    off, on = results["forward"]
    print(f"headline: the write guard adds {on - off:.0f} us to a tiny forward "
          f"({off:.0f} us, +{100 * (on - off) / off:.1f}%)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 60)

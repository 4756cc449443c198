"""A request's work budget, bound to its thread while it runs.

`request_budget` binds the budget of the request whose stop it is given: a `native.Budget` that
the native guard's kernels read, or, when the native guard is unavailable, a `Budget` that the
Python fallback guard reads (`BOUND`). Either is the point past which no op may be expected to run
and a flag the request's stop sets; once it is set, every op the guard sees raises the stop
(`raise_stop` here, `native/guard_checks.h` for the native kernels).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from model_runtime.replica.request_thread import StopSignal
from model_runtime.sandbox.errors import RequestTimeout
from model_runtime.sandbox.work_bounds.rates import measure_rates

# What a request's stop raises: the sandbox worker's cancel, the runtime's request threads' cancel.
STOP_TYPES: tuple[type[BaseException], ...] = (RequestTimeout, SystemExit)


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


def raise_stop(budget: Budget, op: str) -> None:
    """Raise the request's stop at `op` (the Python fallback guard; counted)."""
    PYTHON_COUNTERS[0] += 1
    raise budget.cancel(f"the request ran past its time limit and was stopped (at {op})")

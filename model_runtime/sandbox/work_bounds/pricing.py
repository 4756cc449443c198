"""Pricing an op against the time its request has left, for the Python fallback guard.

The same table (`COSTS`), formulas, rates and messages as `native/work_bounds.h`, applied by the
dispatch mode (`dispatch_guard.PythonWriteGuard`) to the ops it sees: below autograd, after
composite decomposition. A composite op is priced through the ops it decomposes into (`lstm`
through `mkldnn_rnn_layer`, `einsum` through `bmm`); what a composite op does in C++ between aten
calls is not seen (`linalg_multi_dot`'s order search), nor are the ops kernels call below the mode.
`over_budget` is the decision and its refusal text (`work_bounds::over_budget`).
"""

from __future__ import annotations

import time
from typing import Any

from model_runtime.sandbox.errors import LimitExceeded
from model_runtime.sandbox.work_bounds.budget import PYTHON_COUNTERS, Budget, raise_stop
from model_runtime.sandbox.work_bounds.op_work import OpArguments, cost_of, priced_kind
from model_runtime.sandbox.work_bounds.priced_ops import ELEMENT_KINDS, Cost
from model_runtime.sandbox.work_bounds.rates import dtype_name, measure_rates


def check_op(budget: Budget, kind: int, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Before a priced op (not a view) runs under the Python guard: its stop, then its price."""
    if budget.stopped:
        raise_stop(budget, func._opname)
    if kind != Cost.VIEW:
        values = OpArguments(func, args, kwargs)
        kind = priced_kind(kind, values)
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


# The rates, once measured: read on every priced op, so a module global rather than a call (and
# its lock) each time.
_rates: dict[str, Any] | None = None


def _measured() -> dict[str, Any]:
    global _rates
    _rates = measure_rates()
    return _rates


def _check_price(budget: Budget, kind: int, op: str, work: float, where: tuple[bool, Any]) -> None:
    refusal = over_budget(budget.limit_at - time.monotonic(), _rates or _measured(), kind, op, work, where)
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
    if kind == Cost.OUTPUTS:  # tensor objects are made by the host, whatever the device
        rate = rates.get("cpu_tensors", 0.0)
    elif steps:
        rate = rates["cpu_steps"] if cpu else rates["device_steps"]
    elif elements:
        rate = rates["cpu_elements"] if cpu else rates["device_elements"]
    elif cpu:  # the measured rate of this dtype; the slowest measured for the others
        by_dtype = rates["cpu_flops"]
        rate = by_dtype.get(dtype_name(dtype)) or min(by_dtype.values())
        if kind == Cost.CUBIC and rates.get("cpu_cubic", 0) > 0:  # factorisations: far below a product's rate
            rate = min(rate, rates["cpu_cubic"])
        if kind == Cost.NARROW_CONV and rates.get("cpu_narrow_conv", 0) > 0:  # few channels per group
            rate = min(rate, rates["cpu_narrow_conv"])
    else:
        rate = rates["device_flops"]
    if rate <= 0:
        return ""
    left = max(0.0, left)
    if work <= rate * left:
        return ""
    if kind == Cost.OUTPUTS:
        return (f"{op} makes ~{work / 1e6:.1f} M tensors, more than the {left:.1f} s this request has left allow "
                f"at this replica's ~{rate / 1e6:.2f} M tensors/s; split into fewer pieces (index or slice the "
                "ones you need)")
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


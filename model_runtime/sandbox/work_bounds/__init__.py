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
  `_transformer_encoder_layer_fwd`) get their floating-point operations from the argument sizes
  (a convolution with few channels per group at its own, slower measured rate: `priced_kind`);
  embedding bags, `pdist` and multilabel margin loss the elements they read;
  views whose logical size memory does not bound (`expand`, `as_strided`, `unfold`, `set_` with a
  size) get their element count after they are made; the n log n families (`sort` and what
  decomposes into it: `argsort`, `msort`, `quantile`; `topk`, `kthvalue`, `median`, `mode`,
  `unique`, every FFT) get their compare steps, elements x log2 of the length sorted or
  transformed; ops that make one tensor per piece (`unbind`, `split`, `chunk`, `tensor_split`)
  the tensors they make, a count memory does not bound. An op that cannot finish in the time the
  request has left (up to `timeout + grace/2`) at the replica's rate is refused with
  `LimitExceeded` naming its size and the rate. The CPU rates are measured once per process
  (`rates.measure_rates`) and ops are priced at half those rates; tensors on an accelerator are
  priced at fixed caps above any current device's peak (`rates.DEVICE_FLOPS`, `DEVICE_ELEMENTS`,
  `DEVICE_STEPS`), so only what no device could finish in time is refused there.

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
`_native_multi_head_attention`, in `COSTS`; a GRU through the `unbind` of its steps), and a loop
of aten calls in C++ ends at its next call. What it cannot see is C++ work between aten calls of a composite op:
`linalg_multi_dot`'s order search (cubic in the number of operands); such a call ends only when
it returns. Kernels it sees whole that multiply inside are in `COSTS` (priced whole).

The package's modules, one job each: `priced_ops` (which ops are priced, and in what unit),
`op_work` (the work a call is about to do, from its arguments), `rates` (the replica's rates:
measured on its CPU, capped on accelerators), `budget` (binding a request's budget to its thread,
and raising its stop) and `pricing` (the Python fallback guard's price of an op against the time
left). This module is their surface for the guards and the executor.
"""

from model_runtime.sandbox.work_bounds.budget import (
    BOUND,
    PYTHON_COUNTERS,
    STOP_TYPES,
    Budget,
    raise_stop,
    request_budget,
)
from model_runtime.sandbox.work_bounds.priced_ops import COSTS, Cost, cost_kind
from model_runtime.sandbox.work_bounds.pricing import check_op, check_view
from model_runtime.sandbox.work_bounds.rates import install, measure_rates

__all__ = [
    "BOUND",
    "COSTS",
    "PYTHON_COUNTERS",
    "STOP_TYPES",
    "Budget",
    "Cost",
    "check_op",
    "check_view",
    "cost_kind",
    "install",
    "measure_rates",
    "raise_stop",
    "request_budget",
]

"""One long C call cannot keep a request past its stop: programs that would sit in a single C
builtin or torch kernel (`attacks/native_work.py`) run through the production path and each is
refused up front (its size priced before the call) or ends at its stop (a stop-checked source, or
a guarded kernel raising it inside a C++ loop); never wedged, and the same replica serves the next
request correctly. Under both write guards: the native kernels, and the Python dispatch mode a
replica falls back to when they do not load (`guard`), which prices the same ops from the same
table and raises the same stop, with one exception it cannot see (`PYTHON_GUARD_BLIND`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from model_runtime.sandbox import LimitExceeded, Limits, builtin_bounds, dispatch_guard, native_guard, work_bounds
from sandbox.attacks import native_work
from sandbox.harness import weights_digest
from sandbox.legit_programs import save_logits

SHORT = Limits(timeout_s=0.5, grace_s=4.0, memory_bytes=2 * 1024**3, max_result_bytes=4 * 1024**2)


# Under the Python guard, a program whose work is one C++ loop with no aten call inside, in an op
# that decomposes above the dispatch mode: `linalg_multi_dot` is composite, so the mode sees only
# the `mm`s after its order search (O(n**3) in the number of operands, in C++); the native guard's
# key sits above the decomposition and prices it. Not run under the Python guard (it would wedge).
PYTHON_GUARD_BLIND = {"multi_dot_order_search": "linalg_multi_dot's order search runs in C++ above the dispatch mode"}
# The native key prices `tensor_split` whole; the Python guard sees it decomposed into one `slice`
# per piece, each stop-checked: there it ends at its stop.
PYTHON_GUARD_ENDS_AT_STOP = frozenset({"tensor_split_sections"})
# Priced before their long call and refused when this box's rates say they cannot finish in time,
# else they run and end at their stop (the native guard prices `gru` whole; the Python guard sees
# `gru` decomposed and prices the `unbind` of its steps, its one call the stop cannot reach).
REFUSED_OR_ENDS_AT_STOP = {"native": frozenset({"gru_long_sequence", "gru_many_steps"}),
                           "python": frozenset({"gru_long_sequence"})}
_REFUSAL_WORDS = ("bits", "GFLOP", "elements", "quadratic", "n log n", "tensors")


@pytest.fixture(params=["native", "python"])
def guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Which write guard requests run under: 'python' as on a replica whose native guard does not load."""
    if request.param == "python":
        monkeypatch.setattr(native_guard, "load", lambda: None)
    yield request.param


@pytest.fixture(scope="module")
def reference(models: tuple[Any, Any]) -> dict[str, Any]:
    return save_logits(models[1], None)


@pytest.mark.parametrize("attack", native_work.ATTACKS, ids=lambda a: a.__name__)
def test_one_long_c_call_ends_or_is_refused(attack: Any, guard: str, models: tuple[Any, Any], backend: Any,
                                            reference: Any) -> None:
    if guard == "python" and attack.__name__ in PYTHON_GUARD_BLIND:
        pytest.skip(PYTHON_GUARD_BLIND[attack.__name__])
    client, server = models
    before = weights_digest(server)
    be = backend(limits=SHORT)
    with pytest.raises(LimitExceeded) as info:
        attack(client, be)
    outcome = be.outcome
    assert not outcome.wedged, outcome.meta
    name = attack.__name__
    if name in REFUSED_OR_ENDS_AT_STOP[guard]:
        ends_at_stop = outcome.timed_out
    else:
        ends_at_stop = name in native_work.ENDS_AT_STOP or (guard == "python" and name in PYTHON_GUARD_ENDS_AT_STOP)
    if ends_at_stop:  # at the first guarded op after the stop, well before it would be forced
        assert outcome.timed_out and outcome.meta["stop"] == "cooperative", outcome.meta
    elif not outcome.timed_out:  # refused before the long call, with the bound it is over
        assert any(word in str(info.value) for word in _REFUSAL_WORDS), info.value
    assert weights_digest(server) == before
    after = save_logits(client, backend())
    assert torch.equal(after["logits"], reference["logits"]), "the next request is wrong"


def test_heavy_families_have_kernels_and_light_ops_fall_through() -> None:
    native = native_guard.load()
    assert native is not None, native_guard.failure()
    priced = {("aten::mm", ""): work_bounds.Cost.MATMUL, ("aten::convolution", ""): work_bounds.Cost.CONV,
              ("aten::_scaled_dot_product_flash_attention_for_cpu", ""): work_bounds.Cost.ATTENTION,
              ("aten::_linalg_eigh", ""): work_bounds.Cost.CUBIC, ("aten::max_pool2d", ""): work_bounds.Cost.POOL,
              ("aten::expand", ""): work_bounds.Cost.VIEW, ("aten::_cdist_forward", ""): work_bounds.Cost.PAIRWISE,
              ("aten::sort", "stable"): work_bounds.Cost.NLOGN, ("aten::_fft_c2r", ""): work_bounds.Cost.NLOGN,
              ("aten::_unique2", ""): work_bounds.Cost.NLOGN, ("aten::median", "dim"): work_bounds.Cost.NLOGN,
              ("aten::unbind", "int"): work_bounds.Cost.OUTPUTS, ("aten::split", "Tensor"): work_bounds.Cost.OUTPUTS,
              ("aten::tensor_split", "sections"): work_bounds.Cost.OUTPUTS}
    for (name, overload), kind in priced.items():
        assert native.cost_kind(name, overload) == kind, name
    for name, overload in (("aten::add", "Tensor"), ("aten::view", ""), ("aten::sum", ""),
                           ("aten::unique_consecutive", ""), ("aten::searchsorted", "Tensor")):
        assert native.cost_kind(name, overload) == work_bounds.Cost.NONE, name


def test_the_python_guard_prices_the_ops_the_native_kernels_price() -> None:
    """One table: every op in the registry gets the same cost family from both guards."""
    native = native_guard.load()
    assert native is not None, native_guard.failure()
    priced = 0
    for name in torch._C._dispatch_get_all_op_names():
        namespace, _, rest = name.partition("::")
        packet = getattr(getattr(torch.ops, namespace, None), rest.split(".")[0], None)
        overload = rest.split(".")[1] if "." in rest else "default"
        op = getattr(packet, overload, None)
        if op is None:
            continue
        kind = dispatch_guard.op_rule(op).cost
        assert native.cost_kind(op._schema.name, op._schema.overload_name) == kind, name
        priced += kind != 0
    assert priced > 100


def _guarded_on_a_request_thread(body: Any, server: tuple[torch.Tensor, ...] = (), timeout_s: float = 30,
                                 guard: str = "native") -> None:
    """Run `body()` on a request thread under the write guard (with `server` as server memory)
    and its budget."""
    from model_runtime.replica.request_thread import RequestThread, current_stop
    from model_runtime.sandbox.dispatch_guard import ServerStorage, WriteGuard

    def work() -> None:
        with WriteGuard(ServerStorage.of(server)) as write_guard, \
                work_bounds.request_budget(current_stop()) as budget:
            assert budget is not None and write_guard.native == (guard == "native")
            body()

    thread = RequestThread("t")
    thread.run(work, timeout_s=timeout_s, grace_s=1, cancel=SystemExit)
    thread.stop()


HOT_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::as_strided", "aten::expand",
           "aten::empty.memory_format", "aten::empty_strided", "aten::copy_", "aten::fill_.Scalar",
           "aten::add_.Tensor", "aten::div_.Scalar", "aten::sum.IntList_out", "aten::detach_")


def _guard_kernel(name: str) -> str:
    native = native_guard.load()
    assert native is not None, native_guard.failure()
    return next(line for line in torch._C._dispatch_dump(name).splitlines()
                if line.startswith(f"{native.dispatch_key}: ndif write guard"))


def test_the_ops_a_forward_calls_most_have_typed_kernels() -> None:
    for name in HOT_OPS:
        assert "ndif write guard (typed)" in _guard_kernel(name), name
    # a rule a typed kernel cannot apply keeps the boxed kernel: running statistics, growth, out= products
    for name in ("aten::native_batch_norm", "aten::resize_", "aten::mm.out", "aten::set_.source_Storage"):
        kernel = _guard_kernel(name)
        assert "(typed)" not in kernel and "fallthrough" not in kernel, (name, kernel)


def test_typed_kernels_refuse_writes_price_products_and_raise_the_stop(guard: str) -> None:
    """The typed kernels called as C++ calls them (unboxed, from tensor methods): the same rules;
    and the same outcomes under the Python guard."""
    from model_runtime.replica.request_thread import current_stop
    from model_runtime.sandbox.errors import ModelTampering

    weight = torch.rand(4, 4)
    before = weight.clone()
    big = torch.ones(4000, 4000)
    outcomes: dict[str, str] = {}

    def attempt(name: str, call: Any) -> None:
        try:
            call()
            outcomes[name] = "ran"
        except (ModelTampering, LimitExceeded, SystemExit) as exc:
            outcomes[name] = type(exc).__name__

    def body() -> None:
        x = torch.ones(4, 4)
        attempt("copy_", lambda: weight.copy_(x))
        attempt("add_ on a view", lambda: weight.view(-1).add_(1))
        attempt("div_", lambda: weight[1].div_(2))
        attempt("fill_", lambda: weight.fill_(0))
        attempt("sum out=", lambda: torch.sum(x, 0, out=weight[0]))
        attempt("detach_", lambda: weight.detach_())
        attempt("user copy_", lambda: x.copy_(weight))
        attempt("mm", lambda: torch.mm(big, big))
        attempt("addmm", lambda: torch.addmm(big, big, big))
        attempt("baddbmm", lambda: torch.baddbmm(big[None], big[None], big[None]))
        attempt("small mm", lambda: torch.mm(x, x))
        current_stop().set()
        attempt("copy_ after the stop", lambda: x.copy_(x))
        attempt("as_strided after the stop", lambda: x.as_strided((2,), (1,)))
        attempt("mm after the stop", lambda: torch.mm(x, x))

    _guarded_on_a_request_thread(body, server=(weight,), timeout_s=0.5, guard=guard)
    if guard == "python":  # `detach_` ends above the dispatch mode (metadata only; integrity checks it)
        assert outcomes.pop("detach_") == "ran"
        outcomes["detach_"] = "ModelTampering"
    assert outcomes == {
        "copy_": "ModelTampering", "add_ on a view": "ModelTampering", "div_": "ModelTampering",
        "fill_": "ModelTampering", "sum out=": "ModelTampering", "detach_": "ModelTampering", "user copy_": "ran",
        "mm": "LimitExceeded", "addmm": "LimitExceeded", "baddbmm": "LimitExceeded", "small mm": "ran",
        "copy_ after the stop": "SystemExit", "as_strided after the stop": "SystemExit",
        "mm after the stop": "SystemExit",
    }
    assert torch.equal(weight, before)


def test_a_stopped_budget_raises_at_the_next_guarded_op(guard: str) -> None:
    from model_runtime.replica.request_thread import current_stop

    seen: list[str] = []

    def body() -> None:
        torch.ones(2) @ torch.ones(2)  # priced and far under the budget: runs
        current_stop().set()
        try:
            torch.zeros(3)  # an allocation: the guard's kernel raises the stop
        except SystemExit as exc:
            seen.append(str(exc))

    _guarded_on_a_request_thread(body, guard=guard)
    # the native key sees the `empty` that `zeros` calls; the Python mode sees `zeros` itself
    op = {"native": "empty", "python": "zeros"}[guard]
    assert seen == [f"the request ran past its time limit and was stopped (at {op})"], seen


def test_int_bounds_keep_ordinary_arithmetic() -> None:
    assert builtin_bounds.checked_binop("**", 2, 100) == 2**100
    assert builtin_bounds.checked_binop("*", "ab", 3) == "ababab"
    assert builtin_bounds.checked_binop("%", "%s!", 1) == "1!"
    with pytest.raises(LimitExceeded, match="bits"):
        builtin_bounds.checked_binop("<<", 1, builtin_bounds.MAX_INT_BITS + 1)
    assert list(builtin_bounds.BUILTINS["range"](3)) == [0, 1, 2]
    long_range = builtin_bounds.BUILTINS["range"](10**13)
    assert len(long_range) == 10**13 and long_range[5] == 5 and 7 in long_range


def test_views_within_their_memory_are_never_priced(guard: str) -> None:
    """Only a view larger than its memory is priced: reading any other is bounded by memory."""
    big = torch.zeros(2000, 2000)
    seen: list[str] = []

    def body() -> None:
        big.t()[::2].expand(3, 1000, 2000).unfold(2, 4, 4)  # views of 4M floats' memory: free
        torch.zeros(1).expand(2000, 2000)  # 4M elements over 4 bytes, well inside the budget
        try:
            torch.zeros(1).expand(10**6, 10**6)
        except LimitExceeded as exc:
            seen.append(str(exc))

    _guarded_on_a_request_thread(body, guard=guard)
    assert seen and "elements" in seen[0]


def test_n_log_n_ops_of_ordinary_sizes_run_and_huge_ones_are_refused(guard: str) -> None:
    """Sorts, top-k, unique and FFTs over what research programs use (a vocabulary's logits per
    position, a layer's activations, a spectrum per row) run under a 30 s budget; one whose
    compare steps exceed it at the measured sort rate is refused up front, with its size."""
    logits = torch.randn(8, 64, 4096)
    hidden = torch.randn(8, 512, 256)
    seen: list[str] = []

    def body() -> None:
        logits[:, -1].sort(dim=-1, descending=True)
        logits.topk(10, dim=-1)
        logits.argsort(dim=-1)
        logits[0].kthvalue(5, dim=-1)
        logits.median(dim=-1)
        torch.quantile(hidden[0, :, 0], torch.tensor([0.25, 0.75]))
        torch.unique(logits.argmax(dim=-1), return_counts=True)
        torch.fft.rfft(hidden, dim=1)
        torch.fft.irfft2(torch.fft.rfft2(hidden))
        try:  # 2**27 elements: ~3.6 G steps, past 30 s at the measured rate (~0.1 G steps/s here)
            torch.zeros(2**27).sort()
        except LimitExceeded as exc:
            seen.append(str(exc))

    _guarded_on_a_request_thread(body, guard=guard)
    assert seen and "n log n" in seen[0] and "sort" in seen[0], seen


def _ran_or_refused_at(call: Any) -> str:
    """'ran', or the op a `LimitExceeded` refusal names."""
    try:
        call()
    except LimitExceeded as exc:
        return str(exc).split(" ", 2)[1]
    return "ran"


def test_inference_mode_hides_no_op_from_the_guard(guard: str) -> None:
    """In inference mode (and on inference tensors) composite ops (`matmul`, `linear`,
    `scaled_dot_product_attention`) reach a dispatch mode before their decomposition; the Python
    guard decomposes them under itself, so their products are priced as under the native guard."""
    attention = torch.nn.MultiheadAttention(256, 1, batch_first=True).eval()
    short, long = torch.ones(1, 64, 256), torch.ones(1, 2**14, 256)
    big = torch.ones(6000, 6000)  # a product: ~430 GFLOP
    seen: list[str] = []

    def body() -> None:
        with torch.inference_mode():
            attention(short, short, short, need_weights=False)
            torch.nn.functional.linear(short, big[:256, :256])
            for call in (lambda: attention(long, long, long, need_weights=False), lambda: big @ big,
                         lambda: torch.nn.functional.linear(big, big)):
                seen.append(_ran_or_refused_at(call))

    _guarded_on_a_request_thread(body, timeout_s=2.5, guard=guard)
    assert seen == ["_scaled_dot_product_flash_attention_for_cpu", "mm", "addmm"] or \
        seen == ["_scaled_dot_product_flash_attention_for_cpu", "mm", "mm"], seen


def _refused_so_far(guard: str) -> int:
    if guard == "python":
        return work_bounds.PYTHON_COUNTERS[1]
    native = native_guard.loaded()
    assert native is not None
    return int(native.budget_counters()[1])


def test_a_forward_at_the_deployment_limits_is_not_refused(guard: str, models: tuple[Any, Any],
                                                           backend: Any) -> None:
    """The tiny model at maxBatchSize x maxSequenceLength (the defaults: 8 x 2048) under a short
    timeout: every op is priced, none refused (under either guard)."""
    client, _ = models
    limits = Limits(timeout_s=3.0, grace_s=2.0, memory_bytes=4 * 1024**3, max_result_bytes=4 * 1024**2)
    ids = torch.ones(limits.max_batch_size, limits.max_sequence_length, dtype=torch.long)
    refused_before = _refused_so_far(guard)
    with client.trace({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, backend=backend(limits=limits)):
        last = client.lm_head.output[:, -1, :2].clone().save()
    assert last.shape == (limits.max_batch_size, 2)
    assert _refused_so_far(guard) == refused_before


def test_both_guards_refuse_each_family_with_the_same_price(monkeypatch: pytest.MonkeyPatch) -> None:
    """One over-budget call per family, each in its own request, under each guard: the same
    refusal, naming the same size and rate (the seconds left differ, and the op named where the
    native key sees an op above the one the dispatch mode sees: `max_pool1d` above
    `max_pool2d_with_indices`, the `as_strided` that `expand` calls, the `mm` of `cdist`'s kernel)."""
    calls = {
        "matmul": lambda: torch.ones(4000, 4000) @ torch.ones(4000, 8000),
        "conv": lambda: torch.nn.functional.conv1d(torch.ones(1, 1, 2**22), torch.ones(1, 1, 2**21)),
        "attention": lambda: torch.nn.functional.scaled_dot_product_attention(
            *(torch.ones(1, 1, 40000, 64) for _ in range(3))),
        "cubic": lambda: torch.linalg.eigh(torch.eye(6000, dtype=torch.float64)),
        "pool": lambda: torch.nn.functional.max_pool1d(torch.ones(1, 1, 2**24), 2**23, 1),
        "pairwise": lambda: torch.cdist(torch.ones(40000, 100), torch.ones(40000, 100)),
        "view": lambda: torch.ones(1).expand(10**6, 10**6),
        "sort": lambda: torch.rand(2**25).sort(dim=0),
        "fft": lambda: torch.fft.fft(torch.rand(2**25 - 3)),
        "recurrent": lambda: torch.nn.LSTM(256, 256)(torch.zeros(2 * 10**5, 1, 256)),
        # over views: refused before they run, so nothing needs the memory
        "narrow conv": lambda: torch.nn.functional.conv1d(torch.ones(1, 4, 1).expand(1, 4, 2**23),
                                                          torch.ones(4, 1, 2**10), groups=4),
        "large sort": lambda: torch.zeros(2**7, 1, dtype=torch.long).expand(2**7, 2**17).sort(dim=0),
        "outputs": lambda: torch.empty(10**7, 0).unbind(),
        "split": lambda: torch.zeros(10**7).split(1),
    }
    refusals: dict[str, dict[str, str]] = {"native": {}, "python": {}}
    for guard, seen in refusals.items():
        for family, call in calls.items():

            def body(family: str = family, call: Any = call, seen: dict[str, str] = seen) -> None:
                try:
                    call()
                    seen[family] = "ran"
                except LimitExceeded as exc:
                    seen[family] = re.sub(r"the [0-9.]+ s", "the T s", str(exc)).split(" ", 2)[2]

            with monkeypatch.context() as patch:
                if guard == "python":
                    patch.setattr(native_guard, "load", lambda: None)
                _guarded_on_a_request_thread(body, timeout_s=2.5, guard=guard)
    assert list(refusals["python"]) == list(calls) and "ran" not in refusals["python"].values(), refusals
    # Priced at different ops, within 3%: the native guard prices `lstm` above its decomposition
    # (its initial states counted as weights), the Python one the layer it runs; the native one
    # prices the `mm` of `cdist`'s kernel (two extra columns), the Python one `_euclidean_dist`.
    for family in ("recurrent", "pairwise"):
        native_work, python_work = (float(refusals[guard].pop(family).split("~")[1].split(" ")[0])
                                    for guard in ("native", "python"))
        assert abs(native_work - python_work) < 0.03 * native_work, family
    assert refusals["python"] == refusals["native"]


# Name parts of the op families whose work can grow faster than the memory they touch: products,
# convolutions, attention, factorisations, pairwise distances, sorts, transforms, pooling windows,
# recurrences, bags, pairwise losses. An op of the registry whose name has one, that reaches the
# guards whole (any overload not decomposed above them) is priced or listed below with why not.
_HEAVY_EXACT = frozenset({"det", "lu", "qr", "inv", "mode", "dot", "bag", "chain", "multi"})
_HEAVY_PREFIXES = (
    "conv", "pool", "fft", "linalg", "sort", "argsort", "rnn", "lstm", "gru", "attention", "attn", "eig", "svd",
    "cholesky", "solve", "lstsq", "pinv", "dist", "cdist", "pdist", "topk", "kthvalue", "median", "nanmedian",
    "unique", "kron", "einsum", "tensordot", "matrix", "margin", "ctc", "histogram", "householder", "triangular",
    "geqrf", "ormqr", "transformer", "linear", "bilinear", "trilinear", "matmul", "slogdet", "embedding",
)
_LINEAR = "linear in the memory it reads or writes"
_ACCELERATOR = "no CPU kernel; a private accelerator kernel no public function reaches whole"
UNPRICED_HEAVY_NAMES: dict[str, str] = {
    # pooling with adaptive windows: neighbouring windows overlap by at most one row
    **dict.fromkeys(("_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                     "adaptive_avg_pool3d", "adaptive_max_pool2d", "adaptive_max_pool3d",
                     "mkldnn_adaptive_avg_pool2d"), "adaptive windows: " + _LINEAR),
    **dict.fromkeys(("upsample_bilinear2d", "upsample_linear1d", "upsample_trilinear3d", "_upsample_bilinear2d_aa",
                     "linalg_cross", "linalg_vector_norm", "linalg__powsum", "dist", "dot", "lu_unpack",
                     "_linalg_check_errors", "unique_consecutive", "unique_dim_consecutive", "multi_margin_loss",
                     "soft_margin_loss", "histogram", "_histogramdd_bin_edges", "_histogramdd_from_bin_cts",
                     "_histogramdd_from_bin_tensors", "_convert_indices_from_coo_to_csr",
                     "_convert_indices_from_csr_to_coo", "fft_fftfreq", "fft_rfftfreq", "embedding",
                     "embedding_renorm", "embedding_renorm_"), _LINEAR),
    **dict.fromkeys(("_convert_weight_to_int4pack", "_convert_weight_to_int4pack_for_cpu",
                     "mkldnn_reorder_conv2d_weight", "mkldnn_reorder_conv3d_weight", "_cudnn_rnn_flatten_weight"),
                    "a weight's layout conversion: " + _LINEAR),
    **dict.fromkeys(("_ctc_loss", "_cudnn_ctc_loss", "miopen_ctc_loss", "_use_cudnn_ctc_loss",
                     "_use_miopen_ctc_loss"),
                    "linear in the alignment table it allocates (time x target length), which the memory limit "
                    "bounds"),
    "_cholesky_solve_helper": "private; reached only through cholesky_solve, which is priced",
    **dict.fromkeys(("_cslt_sparse_mm", "_cslt_sparse_mm_search", "_mixed_dtypes_linear", "_weight_int4pack_mm",
                     "_weight_int4pack_mm_with_scales_and_zeros", "_lstm_mps"), _ACCELERATOR),
    "_foreach_mm": "private lists of products; no public function calls it",
    **dict.fromkeys(("_thnn_fused_lstm_cell", "_thnn_fused_gru_cell"),
                    "one recurrent step's gates (elementwise; the products are separate mm calls)"),
    **dict.fromkeys(("quantized_lstm", "quantized_gru"),
                    "need packed quantized weights, which requests cannot build (torch.ops and private names are "
                    "denied)"),
}


def _heavy_name(name: str) -> bool:
    parts = [p for p in name.split("_") if p]
    return any(p in _HEAVY_EXACT or p.startswith(_HEAVY_PREFIXES) or p.endswith("mm") for p in parts)


def test_every_heavy_kernel_is_priced_or_reviewed() -> None:
    """Enumerates torch's op registry: an op whose name says its work may outgrow its memory and
    that reaches the guards as one kernel is priced (`work_bounds.COSTS`), or reviewed above with
    the reason it needs no price. A new such op in a torch upgrade fails here until decided."""
    from torch._C import _dispatch_has_kernel_for_dispatch_key as has_kernel

    unreviewed, seen = [], set()
    for full in torch._C._dispatch_get_all_op_names():
        if not full.startswith("aten::"):
            continue
        name, _, overload = full[len("aten::"):].partition(".")
        if "backward" in name or not _heavy_name(name):
            continue
        try:
            whole = not has_kernel(full, "CompositeImplicitAutograd")
        except RuntimeError:
            continue
        if whole and not work_bounds.cost_kind(name, overload):
            seen.add(name)
            if name not in UNPRICED_HEAVY_NAMES:
                unreviewed.append(full)
    assert not unreviewed, f"price these in work_bounds.COSTS (and native/work_bounds.h) or review them: {unreviewed}"
    stale = sorted(set(UNPRICED_HEAVY_NAMES) - seen)
    assert not stale, f"reviewed names that are now priced, decomposed or gone: {stale}"
    # an in-place form of a priced op is priced too
    for name in work_bounds.COSTS:
        inplace = getattr(torch.ops.aten, f"{name}_", None) if "." not in name else None
        if inplace is not None:
            assert work_bounds.cost_kind(f"{name}_", ""), name


def test_kernels_that_multiply_or_pair_inside_are_priced_whole(guard: str) -> None:
    """Kernels whose products, pairs or windows run inside one call (the Python fallback guard
    sees nothing below them): an ordinary size runs, one past the budget is refused up front,
    named, under both guards."""
    fn = torch.nn.functional
    encoder = torch.nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True).eval()
    target, big = torch.empty(6000, 6000), torch.ones(6000, 6000)  # a product of these: ~430 GFLOP
    calls = {  # op the refusal names: (an ordinary call, one far past a 2.5 s budget)
        "_trilinear": (lambda: fn.bilinear(torch.ones(8, 16), torch.ones(8, 16), torch.ones(4, 16, 16)),
                       lambda: fn.bilinear(torch.ones(2**16, 256), torch.ones(2**16, 256), torch.ones(256, 256, 256))),
        "_transformer_encoder_layer_fwd": (lambda: encoder(torch.ones(2, 16, 256)),
                                           lambda: encoder(torch.ones(1, 2**15, 256))),
        "conv_tbc": (lambda: torch.conv_tbc(torch.ones(64, 2, 8), torch.ones(3, 8, 8), torch.ones(8), 1),
                     lambda: torch.conv_tbc(torch.ones(2**16, 1, 64), torch.ones(2**12, 64, 64), torch.ones(64), 0)),
        "_pdist_forward": (lambda: torch.pdist(torch.ones(64, 16)), lambda: torch.pdist(torch.ones(2**15, 512))),
        "_embedding_bag_forward_only": (
            lambda: fn.embedding_bag(torch.zeros(32, dtype=torch.long), torch.ones(100, 16), torch.tensor([0, 16])),
            lambda: fn.embedding_bag(torch.zeros(2**22, dtype=torch.long), torch.ones(10, 2**16), torch.tensor([0]))),
        "multilabel_margin_loss_forward": (
            lambda: fn.multilabel_margin_loss(torch.ones(4, 10), torch.zeros(4, 10, dtype=torch.long)),
            lambda: fn.multilabel_margin_loss(torch.ones(4, 2**17), torch.zeros(4, 2**17, dtype=torch.long))),
        "fractional_max_pool2d": (
            lambda: fn.fractional_max_pool2d(torch.ones(1, 1, 16, 16), 2, output_size=8),
            lambda: fn.fractional_max_pool2d(torch.ones(1, 1, 2**12, 2**12), 2**11, output_size=2**11)),
        "linalg_pinv": (lambda: torch.linalg.pinv(torch.eye(64, dtype=torch.float64), atol=torch.tensor(0.0)),
                        lambda: torch.linalg.pinv(torch.eye(6000, dtype=torch.float64), atol=torch.tensor(0.0))),
        "addmm_": (lambda: torch.zeros(4, 4).addmm_(torch.ones(4, 4), torch.ones(4, 4)),
                   lambda: target.zero_().addmm_(big, big)),
        "linear": (lambda: fn.linear(torch.ones(4, 4), torch.ones(4, 4), None, out=torch.empty(4, 4)),
                   lambda: fn.linear(big, big, None, out=target)),
    }
    ran: list[str] = []

    def ordinary() -> None:
        with torch.no_grad():  # the encoder layer's fast path (a fused kernel) needs it
            for name, (call, _) in calls.items():
                call()
                ran.append(name)

    _guarded_on_a_request_thread(ordinary, timeout_s=30, guard=guard)
    assert ran == list(calls)
    seen: dict[str, str] = {}
    for name, (_, huge) in calls.items():  # each in its own request

        def body(name: str = name, huge: Any = huge) -> None:
            with torch.no_grad():
                try:
                    huge()
                    seen[name] = "ran"
                except LimitExceeded as exc:
                    seen[name] = str(exc).split(" ", 2)[1]

        _guarded_on_a_request_thread(body, timeout_s=2.5, guard=guard)
    # `F.linear(..., out=)` is priced as `linear` (its `out` overload) by the Python guard; the
    # native key prices it there or at the product it makes
    assert seen.pop("linear") in ("linear", "mm", "addmm"), seen
    assert seen == {name: name for name in calls if name != "linear"}, seen


def test_narrow_convolutions_and_large_sorts_are_priced_at_their_own_rates(guard: str) -> None:
    """Convolutions with few channels per group (single-channel, depthwise) and 8-byte sorts past
    the caches run far below the product and in-cache sort rates: priced at the measured narrow
    convolution rate (more for a large unfolded input) and with more steps, so the sizes research
    uses run, and one the product rate would have let run for seconds past the budget is refused."""
    from model_runtime.sandbox.work_bounds import op_work

    fn = torch.nn.functional
    ordinary = [  # a ConvNeXt block's depthwise 7 x 7, a Mamba layer's depthwise conv1d, a 1-channel blur
        lambda: fn.conv2d(torch.ones(2, 96, 56, 56), torch.ones(96, 1, 7, 7), padding=3, groups=96),
        lambda: fn.conv1d(torch.ones(1, 1536, 2048), torch.ones(1536, 1, 4), padding=3, groups=1536),
        lambda: fn.conv2d(torch.ones(1, 1, 512, 512), torch.ones(1, 1, 5, 5)),
        lambda: fn.conv2d(torch.ones(1, 64, 56, 56), torch.ones(64, 64, 3, 3)),  # dense: the product rate
        lambda: torch.zeros(2**20, dtype=torch.long).view(2**7, 2**13).sort(dim=0),
    ]
    seen: list[str] = []

    def body() -> None:
        for call in ordinary:
            call()
            seen.append("ran")
        for call in (lambda: fn.conv1d(torch.ones(1, 1, 1).expand(1, 1, 2**25), torch.ones(1, 1, 2**10)),
                     lambda: torch.zeros(2**7, 1, dtype=torch.long).expand(2**7, 2**17).sort(dim=0)):
            seen.append(_ran_or_refused_at(call))

    _guarded_on_a_request_thread(body, timeout_s=2.5, guard=guard)
    assert seen == ["ran"] * len(ordinary) + ["convolution", "sort"], seen
    assert op_work.NARROW_LARGE_SLOWDOWN > 1 and op_work.LARGE_SORT_SLOWDOWN > 1

"""One long C call cannot keep a request past its stop: programs that would sit in a single C
builtin or torch kernel (`attacks/native_work.py`) run through the production path and each is
refused up front (its size priced before the call) or ends at its stop (a stop-checked source, or
a guarded kernel raising it inside a C++ loop); never wedged, and the same replica serves the next
request correctly.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from model_runtime.sandbox import LimitExceeded, Limits, builtin_bounds, native_guard, work_bounds
from sandbox.attacks import native_work
from sandbox.harness import weights_digest
from sandbox.legit_programs import save_logits

SHORT = Limits(timeout_s=0.5, grace_s=4.0, memory_bytes=2 * 1024**3, max_result_bytes=4 * 1024**2)


@pytest.fixture(scope="module")
def reference(models: tuple[Any, Any]) -> dict[str, Any]:
    return save_logits(models[1], None)


@pytest.mark.parametrize("attack", native_work.ATTACKS, ids=lambda a: a.__name__)
def test_one_long_c_call_ends_or_is_refused(attack: Any, models: tuple[Any, Any], backend: Any,
                                            reference: Any) -> None:
    client, server = models
    before = weights_digest(server)
    be = backend(limits=SHORT)
    with pytest.raises(LimitExceeded) as info:
        attack(client, be)
    outcome = be.outcome
    assert not outcome.wedged, outcome.meta
    if attack.__name__ in native_work.ENDS_AT_STOP:
        assert outcome.timed_out and outcome.meta["stop"] == "cooperative", outcome.meta
    elif not outcome.timed_out:  # refused before the long call, with the bound it is over
        assert any(word in str(info.value) for word in ("bits", "GFLOP", "elements", "quadratic", "n log n")), \
            info.value
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
              ("aten::_unique2", ""): work_bounds.Cost.NLOGN, ("aten::median", "dim"): work_bounds.Cost.NLOGN}
    for (name, overload), kind in priced.items():
        assert native.cost_kind(name, overload) == kind, name
    for name, overload in (("aten::add", "Tensor"), ("aten::view", ""), ("aten::sum", ""),
                           ("aten::unique_consecutive", ""), ("aten::searchsorted", "Tensor")):
        assert native.cost_kind(name, overload) == work_bounds.Cost.NONE, name


def _guarded_on_a_request_thread(body: Any, server: tuple[torch.Tensor, ...] = (), timeout_s: float = 30) -> None:
    """Run `body()` on a request thread under the write guard (with `server` as server memory)
    and its budget."""
    from model_runtime.replica.request_thread import RequestThread, current_stop
    from model_runtime.sandbox.dispatch_guard import ServerStorage, WriteGuard

    def work() -> None:
        with WriteGuard(ServerStorage.of(server)), work_bounds.request_budget(current_stop()) as budget:
            assert budget is not None
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


def test_typed_kernels_refuse_writes_price_products_and_raise_the_stop() -> None:
    """The typed kernels called as C++ calls them (unboxed, from tensor methods): the same rules."""
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

    _guarded_on_a_request_thread(body, server=(weight,), timeout_s=0.5)
    assert outcomes == {
        "copy_": "ModelTampering", "add_ on a view": "ModelTampering", "div_": "ModelTampering",
        "fill_": "ModelTampering", "sum out=": "ModelTampering", "detach_": "ModelTampering", "user copy_": "ran",
        "mm": "LimitExceeded", "addmm": "LimitExceeded", "baddbmm": "LimitExceeded", "small mm": "ran",
        "copy_ after the stop": "SystemExit", "as_strided after the stop": "SystemExit",
        "mm after the stop": "SystemExit",
    }
    assert torch.equal(weight, before)


def test_a_stopped_budget_raises_at_the_next_guarded_op() -> None:
    from model_runtime.replica.request_thread import current_stop

    seen: list[str] = []

    def body() -> None:
        torch.ones(2) @ torch.ones(2)  # priced and far under the budget: runs
        current_stop().set()
        try:
            torch.zeros(3)  # an allocation: the guard's kernel raises the stop
        except SystemExit as exc:
            seen.append(str(exc))

    _guarded_on_a_request_thread(body)
    assert seen and "stopped" in seen[0]


def test_int_bounds_keep_ordinary_arithmetic() -> None:
    assert builtin_bounds.checked_binop("**", 2, 100) == 2**100
    assert builtin_bounds.checked_binop("*", "ab", 3) == "ababab"
    assert builtin_bounds.checked_binop("%", "%s!", 1) == "1!"
    with pytest.raises(LimitExceeded, match="bits"):
        builtin_bounds.checked_binop("<<", 1, builtin_bounds.MAX_INT_BITS + 1)
    assert list(builtin_bounds.BUILTINS["range"](3)) == [0, 1, 2]
    long_range = builtin_bounds.BUILTINS["range"](10**13)
    assert len(long_range) == 10**13 and long_range[5] == 5 and 7 in long_range


def test_views_within_their_memory_are_never_priced() -> None:
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

    _guarded_on_a_request_thread(body)
    assert seen and "elements" in seen[0]


def test_n_log_n_ops_of_ordinary_sizes_run_and_huge_ones_are_refused() -> None:
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

    _guarded_on_a_request_thread(body)
    assert seen and "n log n" in seen[0] and "sort" in seen[0], seen


def test_a_forward_at_the_deployment_limits_is_not_refused(models: tuple[Any, Any], backend: Any) -> None:
    """The tiny model at maxBatchSize x maxSequenceLength (the defaults: 8 x 2048) under a short
    timeout: every op is priced, none refused."""
    client, _ = models
    limits = Limits(timeout_s=3.0, grace_s=2.0, memory_bytes=4 * 1024**3, max_result_bytes=4 * 1024**2)
    ids = torch.ones(limits.max_batch_size, limits.max_sequence_length, dtype=torch.long)
    refused_before = native_guard.load().budget_counters()[1]  # type: ignore[union-attr]
    with client.trace({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, backend=backend(limits=limits)):
        last = client.lm_head.output[:, -1, :2].clone().save()
    assert last.shape == (limits.max_batch_size, 2)
    assert native_guard.load().budget_counters()[1] == refused_before  # type: ignore[union-attr]

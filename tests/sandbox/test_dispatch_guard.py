"""The dispatch-level write guard, against every op with write semantics in torch's registry.

Two implementations, one set of rules (`op_rule`): the native dispatcher kernels a replica runs
(`native_guard.py`) and the Python dispatch mode it falls back to (`PythonWriteGuard`). Checks per
op, none of them a list written by hand:
* the rules: the native kernels derive, for every op in the registry, the same rule as `op_rule`,
  and every op with write semantics has the guard's checking kernel on the guard's key;
* the Python mode's decision: handed the op with a server tensor in each written position, it
  refuses before the kernel runs (every op in the registry, whether or not it can be called here);
* the real dispatcher, for both: the op called with a server tensor in its written positions under
  the guard is refused, or is rejected by the op's own argument checks before anything is written
  (reason recorded per op), or (Python mode only) is one of the autograd-level ops that never reach
  a dispatch mode and write no tensor data (`AUTOGRAD_LEVEL`, covered by `integrity.py`); the
  server tensor's bytes are unchanged in every case;
* allocation: every op that returns uninitialised memory hands out zeros under the guard.
"""

from __future__ import annotations

import collections
from typing import Any

import pytest
import torch

from model_runtime.sandbox import native_guard
from model_runtime.sandbox.dispatch_guard import (
    UNINITIALISED_ALLOCATORS,
    PythonWriteGuard,
    ServerStorage,
    WriteGuard,
    op_rule,
    server_tensors,
)
from model_runtime.sandbox.errors import ModelTampering
from sandbox.write_ops import build_call, registry_ops, write_ops

# Handled by autograd before any dispatch mode sees them; they change autograd metadata or swap
# which storage a tensor points at, never the bytes of server memory. `integrity.py` checks the
# server tensors' storage identity and `requires_grad` after every request.
AUTOGRAD_LEVEL = {
    "aten.set_data.default": "swaps the tensor's storage (`.data = x`); integrity checks storage identity",
    "aten.detach_.default": "autograd metadata only; integrity checks requires_grad",
    "aten.requires_grad_.default": "autograd metadata only; integrity checks requires_grad",
    "aten.retain_grad.default": "autograd metadata of a non-leaf only",
}

WRITE_OPS = write_ops()
GUARDS = {"native": native_guard.NativeWriteGuard, "python": PythonWriteGuard}


@pytest.fixture(params=sorted(GUARDS))
def make_guard(request: pytest.FixtureRequest) -> Any:
    return GUARDS[request.param]


def _server() -> tuple[torch.nn.Module, torch.Tensor]:
    module = torch.nn.Module()
    module.register_buffer("w", torch.rand(4, 4))
    return module, module.w


def test_the_registry_lists_the_write_ops_the_issue_names() -> None:
    names = {str(op) for op in WRITE_OPS}
    assert len(WRITE_OPS) > 1000
    for expected in (
        "aten.add_.Tensor", "aten.mul.out", "aten.copy_.default", "aten.resize_.default",
        "aten.set_.source_Storage", "aten.native_batch_norm.default", "aten.embedding_renorm_.default",
        "aten.normal_.default", "aten._foreach_add_.Scalar", "aten.index_put_.default",
    ):
        assert expected in names, expected


def test_the_native_guard_is_built_and_is_what_requests_run_under() -> None:
    assert native_guard.load() is not None, native_guard.failure()
    assert WriteGuard(ServerStorage()).native


def test_without_the_native_build_requests_run_under_the_python_mode_and_it_is_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from model_runtime.sandbox import dispatch_guard

    monkeypatch.setattr(native_guard, "load", lambda: None)
    monkeypatch.setattr(native_guard, "failure", lambda: "FileNotFoundError: not built")
    monkeypatch.setattr(dispatch_guard, "_fallback_logged", False)
    module, target = _server()
    with caplog.at_level("WARNING"):
        guard = WriteGuard(ServerStorage.of_modules([module]))
    assert not guard.native and "native write guard unavailable (FileNotFoundError: not built)" in caplog.text
    with guard, pytest.raises(ModelTampering):
        target.add_(1)


def test_the_native_kernels_apply_the_same_rule_to_every_op_in_the_registry() -> None:
    native = native_guard.load()
    assert native is not None
    checked = 0
    for op in registry_ops():
        rule = op_rule(op)
        expected = (
            [p for p, _ in rule.written], [p for p, _ in rule.stats],
            -1 if rule.training is None else rule.training[0], rule.allocates, rule.grows,
        )
        assert tuple(native.rule(op._schema.name, op._schema.overload_name)) == expected, op
        checked += 1
    assert checked > 2000


def test_every_write_op_has_the_checking_kernel_on_the_guards_key() -> None:
    native = native_guard.load()
    assert native is not None
    for op in WRITE_OPS:
        name = op._schema.name + (f".{op._overloadname}" if op._overloadname != "default" else "")
        entry = [line for line in torch._C._dispatch_dump(name).splitlines()
                 if line.startswith(f"{native.dispatch_key}: ndif write guard")]
        assert entry and "fallthrough" not in entry[0], (name, entry)


def test_the_python_mode_decides_to_refuse_every_write_op() -> None:
    """Handed any write op with a server tensor where the schema says it writes, the guard
    raises before calling the kernel (the kernel is never reached, so no argument is checked)."""
    module, target = _server()
    guard = PythonWriteGuard(ServerStorage.of_modules([module]))
    for op in WRITE_OPS:
        args, kwargs = build_call(op, target)
        with pytest.raises(ModelTampering):
            guard.__torch_dispatch__(op, (), args, kwargs)
    assert guard.counters.refused == len(WRITE_OPS)


def test_every_write_op_through_the_dispatcher_is_refused_or_unreachable(make_guard: Any) -> None:
    outcomes: dict[str, str] = {}
    for op in WRITE_OPS:
        module, target = _server()
        alias = target.view(-1)  # keeps the original storage even if the op swaps target's
        before = alias.clone()
        args, kwargs = build_call(op, target)
        try:
            with make_guard(ServerStorage.of_modules([module])):
                op(*args, **kwargs)
            outcomes[str(op)] = "ran"
        except ModelTampering:
            outcomes[str(op)] = "refused"
        except Exception as exc:  # the op's own checks on the generic arguments
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            outcomes[str(op)] = f"rejected its arguments: {type(exc).__name__}: {first[:120]}"
        assert torch.equal(alias, before), f"{op} wrote into server memory"
    ran = {name for name, outcome in outcomes.items() if outcome == "ran"}
    assert ran <= set(AUTOGRAD_LEVEL), f"ran past the guard: {sorted(ran - set(AUTOGRAD_LEVEL))}"
    counts = collections.Counter(o if o in ("ran", "refused") else "rejected" for o in outcomes.values())
    # most ops are constructible with generic arguments and are then refused by the guard
    assert counts["refused"] > 0.85 * len(WRITE_OPS), counts


def test_running_stat_updates_and_renorm_are_refused_with_a_clear_message(make_guard: Any) -> None:
    bn = torch.nn.BatchNorm1d(3)
    emb = torch.nn.Embedding(5, 4)
    root = torch.nn.ModuleList([bn, emb]).requires_grad_(False)
    mean, weight = bn.running_mean.clone(), emb.weight.clone()
    with make_guard(ServerStorage.of_modules([root])):
        with pytest.raises(ModelTampering, match="batch_norm"):
            torch.nn.functional.batch_norm(torch.rand(2, 3), bn.running_mean, bn.running_var, training=True)
        with pytest.raises(ModelTampering, match="embedding_renorm_"):
            torch.nn.functional.embedding(torch.tensor([1]), emb.weight, max_norm=0.1)
        with pytest.raises(ModelTampering):
            torch.nn.init.normal(emb.weight)  # the deprecated alias without the underscore
        with pytest.raises(ModelTampering):
            torch.nn.functional.relu(emb.weight[1:3], True)  # `inplace` passed positionally
    assert torch.equal(bn.running_mean, mean) and torch.equal(emb.weight, weight)


def test_the_models_own_eval_forward_reads_running_stats_freely(make_guard: Any) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)).eval().requires_grad_(False)
    expected = model(torch.ones(2, 3))
    with make_guard(ServerStorage.of_modules([model])):
        assert torch.equal(model(torch.ones(2, 3)), expected)


def test_user_tensors_stay_writable_and_gradients_work(make_guard: Any) -> None:
    module = torch.nn.Linear(4, 4).requires_grad_(False)
    with make_guard(ServerStorage.of_modules([module])):
        x = torch.rand(2, 4, requires_grad=True)
        y = module(x)
        y[:, 0] += 1
        y.sum().backward()
        h = module.weight.clone()
        h.add_(1)
        torch.mul(h, 2, out=h)
    assert x.grad is not None and torch.equal(x.grad, module.weight.sum(0).expand(2, 4))


def test_aliases_built_over_server_memory_are_refused(make_guard: Any) -> None:
    module = torch.nn.Linear(4, 4).requires_grad_(False)
    weight = module.weight
    with make_guard(ServerStorage.of_modules([module])):
        over = torch.empty(0).set_(weight.untyped_storage(), 4, (2,), (1,))
        with pytest.raises(ModelTampering):
            over.fill_(0)
        with pytest.raises(ModelTampering):
            weight.t().as_strided((2,), (1,)).zero_()


def test_server_tensors_include_plain_tensor_attributes() -> None:
    module = torch.nn.Linear(2, 2)
    module.cache = torch.ones(3)  # not a parameter or buffer, still the model's
    assert any(t is module.cache for t in server_tensors([module]))


def _allocator_ops() -> list[Any]:
    ops = []
    for full in torch._C._dispatch_get_all_op_names():
        namespace, _, rest = full.partition("::")
        name = rest.partition(".")[0]
        if namespace == "aten" and "empty" in name and not name.startswith(("is_", "_is_")):
            ops.append(name)
    return sorted(set(ops))


def test_every_uninitialised_allocator_in_the_registry_is_zeroed() -> None:
    # Ops named *empty* that do not hand out uninitialised memory, and why.
    not_uninitialised = {
        "_nested_tensor_from_mask_left_aligned", "_sparse_coo_tensor_with_dims", "_local_scalar_dense",
    }
    found = [n for n in _allocator_ops() if n not in not_uninitialised]
    missing = [
        n for n in found
        if n not in UNINITIALISED_ALLOCATORS and not n.endswith(("_cache", "_backward")) and "sparse" not in n
        and "nested" not in n
    ]
    assert not missing, f"allocators the guard does not zero: {missing}"


_DIRTY = 4096


@pytest.mark.parametrize(
    "allocate",
    [
        lambda: torch.empty(_DIRTY),
        lambda: torch.empty_like(torch.ones(_DIRTY)),
        lambda: torch.ones(1).new_empty(_DIRTY),
        lambda: torch.empty_strided((_DIRTY,), (1,)),
        lambda: torch.ones(1).new_empty_strided((_DIRTY,), (1,)),
        lambda: torch.empty_permuted((_DIRTY,), (0,)),
        lambda: torch.Tensor(_DIRTY),
        lambda: torch.FloatTensor(_DIRTY),
        lambda: torch.ones(1).new(_DIRTY),
        lambda: torch.zeros(1).resize_(_DIRTY),
        lambda: torch.zeros(8).resize_as_(torch.ones(_DIRTY)),
    ],
    ids=["empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "empty_permuted",
         "Tensor(n)", "FloatTensor(n)", "new(n)", "resize_", "resize_as_"],
)
def test_allocations_come_back_zeroed(allocate: Any, make_guard: Any) -> None:
    guard = make_guard(ServerStorage())
    for _ in range(20):  # leave freed, non-zero blocks of the same size for the allocator to reuse
        garbage = torch.full((_DIRTY,), 7.0)
        del garbage
        with guard:
            fresh = allocate()
        assert not fresh.any(), "uninitialised memory reached the request"


def test_an_op_registered_after_start_up_is_guarded_too() -> None:
    """A library defining a write op while a request runs: the op is checked on its first call
    (the key's fallback derives its rule) and gets its own kernel at the next guard entry."""
    native = native_guard.load()
    assert native is not None
    module, target = _server()
    before = target.clone()

    def scribble(x: torch.Tensor) -> None:  # writes below the dispatcher, as native code could
        x.detach().numpy().fill(7.0)

    with native_guard.NativeWriteGuard(ServerStorage.of_modules([module])):
        lib = torch.library.Library("ndif_late_op_test", "DEF")  # kept alive until the test ends
        lib.define("scribble(Tensor(a!) x) -> ()")
        lib.impl("scribble", scribble, "CPU")
        assert "ndif write guard ::" not in torch._C._dispatch_dump("ndif_late_op_test::scribble")
        with pytest.raises(ModelTampering, match="scribble"):
            torch.ops.ndif_late_op_test.scribble(target)
    with native_guard.NativeWriteGuard(ServerStorage.of_modules([module])):
        assert "ndif write guard ::" in torch._C._dispatch_dump("ndif_late_op_test::scribble")
        with pytest.raises(ModelTampering, match="scribble"):
            torch.ops.ndif_late_op_test.scribble(target)
        mine = torch.zeros(3)
        torch.ops.ndif_late_op_test.scribble(mine)
    assert torch.equal(target, before) and torch.equal(mine, torch.full((3,), 7.0))

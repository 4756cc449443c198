"""Weight integrity: writes no guard saw are detected after the request, the replica refuses
requests until the weights are restored, and restores them from the kept copy."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import numpy
import pytest
import torch

from model_runtime.replica import execution
from model_runtime.sandbox import executor
from model_runtime.sandbox.errors import ModelTampering
from model_runtime.sandbox.integrity import WeightIntegrity
from model_runtime.sandbox.model_guard import WeightGuard
from sandbox.attacks import below_python
from sandbox.harness import weights_digest
from sandbox.legit_programs import save_logits
from sandbox.test_seam import SeamBackend


def _model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    model.register_buffer("scale", torch.ones(8))
    return model.requires_grad_(False)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return all(torch.equal(state[k], v) and state[k].shape == v.shape for k, v in snapshot.items())


def _numpy_write(model: torch.nn.Module) -> None:
    numpy.asarray(model[0].weight.detach())[:] = 0  # no dispatcher, no version counter


def _set_data(model: torch.nn.Module) -> None:
    model[0].weight.data = torch.zeros(8, 8)


def _requires_grad(model: torch.nn.Module) -> None:
    model[1].weight.requires_grad_(True)


def _version_only(model: torch.nn.Module) -> None:
    with torch.no_grad():
        model.scale.mul_(1.0)  # same bytes, but an in-place write happened


def _buffer_bytes(model: torch.nn.Module) -> None:
    numpy.asarray(model.scale)[:] = 7.0


@pytest.mark.parametrize("reader", ["native", "python"])
@pytest.mark.parametrize("tamper", [_numpy_write, _set_data, _requires_grad, _version_only, _buffer_bytes],
                         ids=lambda f: f.__name__.strip("_"))
def test_tampering_is_detected_and_restored(tamper: Any, reader: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from model_runtime.sandbox import weight_records as module

    if reader == "python":  # the identities read in Python (the native reader not built)
        monkeypatch.setattr(module, "_NATIVE", [None])
    model = _model()
    before = _snapshot(model)
    integrity = WeightIntegrity([model])
    integrity.admit()
    tamper(model)
    with pytest.raises(ModelTampering, match="weights were restored"):
        integrity.verify()
    assert _same(model, before)
    assert not model[1].weight.requires_grad and not integrity.untrusted and integrity.healthy
    integrity.admit()
    integrity.verify()  # and clean again


def test_without_a_copy_the_replica_fails_closed() -> None:
    model = _model()
    integrity = WeightIntegrity([model], keep_copy_bytes=0)
    integrity.admit()
    _numpy_write(model)
    with pytest.raises(ModelTampering, match="replaced"):
        integrity.verify()
    assert not integrity.healthy
    with pytest.raises(ModelTampering, match="not serving"):
        integrity.admit()


def test_a_legitimate_move_reindexes_instead_of_alarming() -> None:
    model = _model()
    integrity = WeightIntegrity([model])
    integrity.admit()
    integrity.verify()
    model.to(torch.float64)  # the server moving or retyping its model between requests
    integrity.admit()
    integrity.verify()


def _replace_parameter(model: torch.nn.Module) -> None:
    model[0]._parameters["weight"] = torch.nn.Parameter(torch.zeros(8, 8), requires_grad=False)


def _add_buffer(model: torch.nn.Module) -> None:
    model[1]._buffers["extra"] = torch.zeros(8)


def _replace_child(model: torch.nn.Module) -> None:
    model._modules["0"] = torch.nn.Linear(8, 8).requires_grad_(False)


def _add_child(model: torch.nn.Module) -> None:
    model._modules["2"] = torch.nn.Linear(8, 8).requires_grad_(False)


def _replace_table(model: torch.nn.Module) -> None:
    vars(model[0])["_parameters"] = dict(model[0]._parameters)  # equal contents, another table


@pytest.mark.parametrize("change", [_replace_parameter, _add_buffer, _replace_child, _add_child],
                         ids=lambda f: f.__name__.strip("_"))
def test_the_tree_record_sees_every_change_to_the_set_of_tensors(change: Any) -> None:
    """The per-request check of the tensor set reads a record of the module tree, not a walk: it
    must see what a walk would (a tensor or module replaced or added in any table)."""
    model = _model()
    before = _snapshot(model)
    tables = [(name, dict(m._modules), dict(m._parameters), dict(m._buffers)) for name, m in model.named_modules()]
    integrity = WeightIntegrity([model])
    integrity.admit()
    change(model)
    with pytest.raises(ModelTampering, match=r"set of tensors changed.*weights were restored"):
        integrity.verify()
    # The replacement is undone, not adopted: every table holds its own objects again, and the
    # next admission finds the indexed tensors (no re-index onto what the request put there).
    assert [(name, dict(m._modules), dict(m._parameters), dict(m._buffers))
            for name, m in model.named_modules()] == tables
    assert _same(model, before) and not integrity.untrusted
    indexed = integrity.tensors
    integrity.admit()
    assert integrity.tensors is indexed
    integrity.verify()


def _swap_through_dict_methods(model: torch.nn.Module) -> None:
    dict.__setitem__(model[0]._parameters, "weight", torch.nn.Parameter(torch.zeros(8, 8), requires_grad=False))


def _swap_module_dict(model: torch.nn.Module) -> None:
    entries = dict(vars(model[0]))
    entries["_parameters"] = {**entries["_parameters"], "weight": torch.nn.Parameter(torch.zeros(8, 8))}
    model[0].__dict__ = entries  # another attribute dict: the recorded one is never written


def _swap_module_class(model: torch.nn.Module) -> None:
    class Shadowed(torch.nn.Linear):
        _parameters = property(lambda self: {"weight": torch.nn.Parameter(torch.zeros(8, 8))})

    model[0].__class__ = Shadowed  # its attribute dict untouched; the class shadows the table


def _shadow_in_a_base_class(model: torch.nn.Module) -> None:
    torch.nn.LayerNorm._buffers = property(lambda self: {"extra": torch.zeros(8)})  # type: ignore[assignment]


def _retype_a_tensor(model: torch.nn.Module) -> None:
    class Marked(torch.nn.Parameter):
        pass

    model[0].weight.__class__ = Marked


@pytest.mark.parametrize("change", [_swap_through_dict_methods, _swap_module_dict, _swap_module_class,
                                    _shadow_in_a_base_class, _retype_a_tensor],
                         ids=lambda f: f.__name__.strip("_"))
def test_the_tree_records_version_tags_miss_no_change(change: Any) -> None:
    """The tree record's shortcut (unwritten dicts: the tables hold what they held) must not hide a
    change that leaves the recorded dicts' tags alone or reaches the tables some other way: a
    module given another attribute dict or class, a class in its MRO given a shadowing
    descriptor, a tensor given another class."""
    from model_runtime.sandbox.dict_versions import dict_version

    model = _model()
    integrity = WeightIntegrity([model])
    tree = integrity._tree
    assert tree is not None and tree.unchanged()
    if dict_version is not None:
        assert tree.tags is not None and tree.tags == [dict_version(d) for d in tree.watched]
    try:
        change(model)
        assert not tree.unchanged()
    finally:
        vars(torch.nn.LayerNorm).get("_buffers") is not None and delattr(torch.nn.LayerNorm, "_buffers")


def test_the_tree_record_written_back_as_it_was_is_unchanged_and_retagged() -> None:
    """A table written but holding its recorded objects again: unchanged, by the full comparison,
    which records the new tags (the next check takes the shortcut again)."""
    from model_runtime.sandbox.dict_versions import dict_version

    model = _model()
    integrity = WeightIntegrity([model])
    tree = integrity._tree
    assert tree is not None
    weight = model[0]._parameters["weight"]
    model[0]._parameters["weight"] = weight  # a write that changes nothing
    assert tree.unchanged()
    if dict_version is not None:
        assert tree.tags == [dict_version(d) for d in tree.watched]


def test_a_table_replaced_with_the_same_tensors_is_no_alarm_and_the_record_follows() -> None:
    model = _model()
    integrity = WeightIntegrity([model])
    integrity.admit()
    _replace_table(model)
    integrity.verify()  # the same tensors, as a walk finds them
    assert integrity._tree is not None and integrity._tree.unchanged()  # re-recorded on the new table
    _replace_parameter(model)
    with pytest.raises(ModelTampering, match="set of tensors changed"):
        integrity.verify()


def test_a_server_that_replaces_parameters_between_requests_is_reindexed() -> None:
    """A loader that swaps Parameter objects (not `.data`) between requests: admitted, re-indexed."""
    model = _model()
    integrity = WeightIntegrity([model])
    integrity.admit()
    integrity.verify()
    _replace_parameter(model)
    integrity.admit()
    assert any(t is model[0].weight for t in integrity.tensors)
    integrity.verify()


def test_the_tree_record_walks_when_it_cannot_vouch() -> None:
    """A tensor subclass (a DTensor's local shard is read through an attribute) or a table that is
    not a plain dict: no record shortcut, the tree is walked every time."""

    class Marked(torch.Tensor):
        pass

    model = _model()
    model.register_buffer("marked", torch.zeros(2).as_subclass(Marked))
    integrity = WeightIntegrity([model])
    assert integrity._tree is not None and not integrity._tree.unchanged()
    integrity.admit()
    integrity.verify()


def test_the_native_gather_reads_the_bytes_the_numpy_views_read() -> None:
    """The fingerprint's samples, gathered by address in C++ where built, are byte for byte what
    the numpy views of the same storages concatenate to, for every sample set (small storages
    read whole, large ones strided), before and after a write into a sampled byte."""
    model = _model()
    model.register_buffer("large", torch.arange(40_000, dtype=torch.float32))
    integrity = WeightIntegrity([model])
    assert integrity._sample_plans is not None and integrity._sample_arrays is not None
    from model_runtime.sandbox.weight_records import native_gather

    def both(chosen: int) -> tuple[bytes, bytes]:
        assert integrity._sample_plans is not None and integrity._sample_arrays is not None
        return (native_gather()(integrity._sample_plans[chosen]),
                numpy.concatenate(integrity._sample_arrays[chosen]).tobytes())

    for chosen in range(len(integrity._samples)):
        native, views = both(chosen)
        assert native == views == integrity._fingerprint_bytes[chosen]
    numpy.asarray(model.large)[:] = -1.0  # every sampled byte of it changes
    for chosen in range(len(integrity._samples)):
        native, views = both(chosen)
        assert native == views != integrity._fingerprint_bytes[chosen]
        assert not integrity._fingerprint_matches(chosen)


def test_identity_columns_are_the_identities() -> None:
    """The per-request identity check reads one list per field; each must be `Identity`'s field."""
    from model_runtime.sandbox.weight_records import Identity, identity_columns

    model = _model()
    model[1].weight.grad = torch.ones(8)
    tensors = [*model.parameters(), *model.buffers(), torch.zeros(4, 2).t(), torch.zeros(3)[1:]]
    columns = identity_columns(tensors)
    assert len(columns) == len(Identity._fields)
    assert [Identity(*fields) for fields in zip(*columns, strict=True)] == [Identity.of(t) for t in tensors]


def _identity_changes() -> list[Any]:
    def conj(t: torch.Tensor) -> None:  # (on the complex weight)
        t.data = t.data.conj()

    def neg(t: torch.Tensor) -> None:
        torch._C._set_neg(t, True)

    return [
        lambda t: setattr(t, "data", torch.zeros(4, 6)),  # another storage
        lambda t: setattr(t, "data", t.data.view(6, 4)),  # same storage, other shape and stride
        lambda t: setattr(t, "data", t.data[1:]),  # other offset
        lambda t: setattr(t, "data", t.data.t()),  # other stride
        lambda t: setattr(t, "data", t.data.view(torch.int32)),  # other dtype
        lambda t: t.requires_grad_(True),
        lambda t: setattr(t, "grad", torch.ones(4, 6)),
        conj, neg,
    ]


@pytest.mark.parametrize("change", range(9))
def test_the_native_identity_reader_sees_what_the_columns_see(change: int) -> None:
    """The packed identities differ exactly when `Identity` does, field by field."""
    from model_runtime.sandbox.weight_records import Identity, identity_record, native_identities

    assert native_identities() is not None, "python -m model_runtime.sandbox.native.build"
    weight = torch.zeros(4, 6, dtype=torch.complex64 if change == 7 else torch.float32)
    other = [torch.zeros(3), torch.zeros(2, 2).t()]
    before, identity = identity_record([*other, weight]), Identity.of(weight)
    assert before is not None and identity_record([*other, weight]) == before
    _identity_changes()[change](weight)
    assert Identity.of(weight) != identity
    assert identity_record([*other, weight]) != before


def test_tensors_the_native_reader_cannot_read_fail_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor the reader raises on (no plain storage) counts as changed: the check fails closed."""
    from model_runtime.sandbox import weight_records as module

    model = _model()
    integrity = WeightIntegrity([model])
    assert integrity._identity_record is not None
    integrity.admit()

    def unreadable(_tensors: Any) -> bytes:
        raise RuntimeError("tensors without storage")

    monkeypatch.setattr(module, "_NATIVE", [types.SimpleNamespace(identities=unreadable)])
    with pytest.raises(ModelTampering, match="storage, layout or autograd flags"):
        integrity.verify()


@pytest.mark.parametrize("on_host", [True, False], ids=["numpy-views", "torch-cat"])
def test_every_sample_set_sees_one_changed_sampled_byte(on_host: bool) -> None:
    """The fingerprint's two readers (numpy views over host memory; `torch.cat` elsewhere) each
    see a single changed byte in whichever sample set is drawn."""
    model = _model()
    integrity = WeightIntegrity([model])
    assert integrity._sample_arrays is not None  # host memory: the numpy readers are used
    arrays = integrity._sample_arrays
    if not on_host:
        integrity._sample_arrays = None
    for chosen, views in enumerate(arrays):
        assert integrity._fingerprint_matches(chosen)
        views[-1][0] ^= 0xFF  # one sampled byte of the last storage (no dispatcher, no version)
        assert not integrity._fingerprint_matches(chosen)
        views[-1][0] ^= 0xFF
    integrity.admit()
    integrity.verify()


@pytest.fixture()
def only_integrity(models: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The dispatch guard off and the Python-level checks blinded: only the integrity check stands."""
    box = executor.default_sandbox()
    monkeypatch.setattr(executor, "WriteGuard", lambda _storage: contextlib.nullcontext())
    monkeypatch.setattr(WeightGuard, "is_protected", lambda self, value: False)
    box.forget(models[1])
    yield
    monkeypatch.undo()
    box.forget(models[1])


@pytest.mark.parametrize("attack", below_python.WEIGHT_ATTACKS[:6], ids=lambda a: a.__name__)
def test_through_execute_request_a_write_no_guard_saw_is_undone(
    attack: Any, models: tuple[Any, Any], only_integrity: None
) -> None:
    client, server = models
    limits = execution.ExecutionLimits(timeout_seconds=10.0, cancel_grace_seconds=3)
    reference = save_logits(server, None)
    before = weights_digest(server)
    with pytest.raises(RuntimeError, match="changed the served model"):
        attack(client, SeamBackend(client, server, limits))
    assert weights_digest(server) == before, "the weights were not restored"
    assert executor.sandbox_healthy()
    after = save_logits(client, SeamBackend(client, server, limits))
    assert torch.equal(after["logits"], reference["logits"])

"""Weight integrity restoring from a restore source (the node's weight store) instead of a kept
copy: the index copies nothing, tampering is undone from the source, a source that no longer
holds the indexed bytes fails closed, and tensors without a source still get a kept copy.

The store is played by read-only numpy arrays laid out as `host_copy.publish` lays them out; the
tensors are made by `host_copy.materialize`, as a replica does on WARM → HOT (the path through
real Ray is tests/runtime/test_weight_store.py).
"""

from __future__ import annotations

import gc
import threading
from typing import Any

import numpy
import pytest
import torch

from model_runtime.replica import host_copy
from model_runtime.sandbox import integrity as module
from model_runtime.sandbox.errors import ModelTampering
from model_runtime.sandbox.integrity import WeightIntegrity, integrity_for, restore_from
from model_runtime.sandbox.restore_source import RestoreSource


def _model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))
    model.register_buffer("scale", torch.rand(64))
    return model.requires_grad_(False)


def _store(model: torch.nn.Module) -> tuple[list[host_copy.Slot], list[list[Any]]]:
    """The model's tensors as the store holds them: one read-only byte array per unique tensor."""
    slots, chunk = [], []
    for tensor, names in host_copy._unique_tensors(model):
        array = host_copy._as_bytes(tensor).copy()
        array.setflags(write=False)
        slots.append(host_copy.Slot(names, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), 0, len(chunk)))
        chunk.append(array)
    return slots, [chunk]


def _moved_from_store(model: torch.nn.Module) -> tuple[list[list[Any]], WeightIntegrity]:
    """WARM → HOT as a store-backed replica does it: new tensors copied from the store's arrays,
    the arrays registered as their restore source, then the first request's index."""
    slots, arrays = _store(model)
    host_copy.dematerialize(model, slots)
    host_copy.materialize(model, slots, arrays, "cpu")
    restore_from(model, host_copy.restore_source(model, slots, arrays))
    return arrays, WeightIntegrity([model])


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(model.state_dict()[k], v) for k, v in snapshot.items())


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.nbytes for t, _ in host_copy._unique_tensors(model))


def test_a_store_backed_index_copies_nothing_its_copies_are_views_of_the_store() -> None:
    model = _model()
    arrays, integrity = _moved_from_store(model)
    assert integrity.kept_bytes == 0 and integrity.source_bytes == _weight_bytes(model)
    assert integrity._copies is not None
    store_addresses = {a.ctypes.data for a in arrays[0]}
    assert {c.data_ptr() for c in integrity._copies} == store_addresses  # views, not copies
    integrity.admit()
    integrity.verify()


@pytest.mark.parametrize("tamper", ["numpy-write", "set-data", "replace-parameter"])
def test_tampering_after_a_store_backed_index_is_restored_from_the_store(tamper: str) -> None:
    model = _model()
    before = _snapshot(model)
    _, integrity = _moved_from_store(model)
    integrity.admit()
    if tamper == "numpy-write":
        numpy.asarray(model[0].weight.detach())[:] = 0  # no dispatcher, no version counter
    elif tamper == "set-data":
        model[0].weight.data = torch.zeros(64, 64)
    else:
        model[2].weight = torch.nn.Parameter(torch.zeros(8, 64), requires_grad=False)
    with pytest.raises(ModelTampering, match="weights were restored"):
        integrity.verify()
    assert _same(model, before) and integrity.healthy and integrity.kept_bytes == 0
    integrity.admit()  # serving continues
    integrity.verify()


def test_a_source_that_no_longer_holds_the_indexed_bytes_fails_closed() -> None:
    model = _model()
    arrays, integrity = _moved_from_store(model)
    integrity.admit()
    corrupted = arrays[0][0]
    corrupted.setflags(write=True)  # (the test's own array: a store's pages are read-only)
    corrupted ^= 0xFF
    numpy.asarray(model[0].weight.detach())[:] = 0
    with pytest.raises(ModelTampering, match="replaced"):
        integrity.verify()
    assert not integrity.healthy
    with pytest.raises(ModelTampering, match="not serving"):
        integrity.admit()


def test_tensors_the_source_does_not_vouch_for_get_a_kept_copy() -> None:
    """A source whose bytes differ from the tensor's at indexing, a tensor moved off the storage
    it was registered with, and no source at all: each such storage is copied."""
    model = _model()
    slots, arrays = _store(model)
    host_copy.dematerialize(model, slots)
    host_copy.materialize(model, slots, arrays, "cpu")
    restore_from(model, host_copy.restore_source(model, slots, arrays))
    with torch.no_grad():
        model[1].weight.add_(1.0)  # the server changed it after the fill: not the source's bytes
    model.scale.data = model.scale.clone()  # another storage than the registered one
    integrity = WeightIntegrity([model])
    expected = model[1].weight.nbytes + model.scale.nbytes
    assert integrity.kept_bytes == expected
    assert integrity.source_bytes == _weight_bytes(model) - expected
    before = _snapshot(model)
    numpy.asarray(model[1].weight.detach())[:] = 0
    numpy.asarray(model.scale)[:] = 0
    with pytest.raises(ModelTampering, match="weights were restored"):
        integrity.verify()
    assert _same(model, before)

    restore_from(model, None)  # no source: everything is copied, as for a replica's private copy
    model.to(torch.float64)
    integrity.admit()  # moved: re-indexed
    assert integrity.kept_bytes == _weight_bytes(model) and integrity.source_bytes == 0
    assert integrity._copies is not None
    live = {t.untyped_storage().data_ptr() for t in integrity.tensors}
    assert not live & {c.data_ptr() for c in integrity._copies}


def test_a_restore_source_takes_flat_byte_arrays_and_vouches_for_its_own_tensors_only() -> None:
    source = RestoreSource()
    tensor = torch.ones(4)
    with pytest.raises(ValueError, match="flat, contiguous uint8"):
        source.add(tensor, numpy.ones(4, dtype=numpy.float32))
    array = numpy.frombuffer(tensor.numpy().tobytes(), dtype=numpy.uint8)
    source.add(tensor, array)
    assert source.pristine(tensor) is array
    assert source.pristine(torch.ones(4)) is None  # another tensor
    tensor.data = torch.ones(4)
    assert source.pristine(tensor) is None  # the registered tensor, on another storage


def test_the_registry_never_keeps_a_model_alive_and_forget_drops_its_record(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "_LOST", threading.Event())
    model = _model()
    record = integrity_for(model)
    assert integrity_for(model) is record and module.record_of(model) is record
    count = len(module._REGISTRY)
    del model, record
    gc.collect()
    assert len(module._REGISTRY) == count - 1  # the entry went with its model

    model = _model()
    integrity_for(model)
    module.forget(model)  # a level move or COLD: dropped at once
    assert module.record_of(model) is None
    assert integrity_for(model) is module.record_of(model)  # indexed afresh on use
    module.forget(model)


def test_a_model_that_could_not_be_restored_keeps_the_process_unhealthy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "_LOST", threading.Event())
    model = _model()
    record = integrity_for(model)
    record._copies = None  # as for a model too large for a kept copy, without a source
    record.admit()
    numpy.asarray(model[0].weight.detach())[:] = 0
    with pytest.raises(ModelTampering, match="replaced"):
        record.verify()
    assert not module.all_healthy()
    module.forget(model)  # a level move drops the record; the replica must still be replaced
    assert not module.all_healthy()


@pytest.mark.parametrize("on_host", [True, False], ids=["fingerprint-bytes", "fingerprint-tensors"])
def test_the_source_check_sees_a_changed_sampled_byte_with_either_fingerprint_reader(on_host: bool) -> None:
    """Host storages compare the source with the fingerprints' bytes; device storages with the
    fingerprint tensors brought to the host: both vouch for an intact source, neither for a
    source with one sampled byte changed."""
    model = _model()
    _, integrity = _moved_from_store(model)
    if not on_host:
        integrity._fingerprint_bytes = []
    assert integrity._copies is not None
    pristine = [c.numpy().copy() for c in integrity._copies]  # the store's bytes, in the index's storage order
    assert all(p is not None for p in integrity._matching_samples(list(pristine)))
    start = integrity._sample_starts[0][0]
    pristine[0][start] ^= 0xFF  # the first sampled byte of the first storage in sample set 0
    matching = integrity._matching_samples(list(pristine))
    assert matching[0] is None and all(p is not None for p in matching[1:])

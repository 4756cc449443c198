"""The weight store's bookkeeping (claims, seals, eviction) and the activation estimate, without Ray."""

from __future__ import annotations

from typing import Any

import pytest

from model_runtime import weight_store
from model_runtime.replica import levels
from model_runtime.weight_store import WeightStore


def _sealed(store: WeightStore, ident: str, holder: str, key: str) -> dict[str, Any]:
    claim = store._claims[ident]
    claim.refs.append("ref-0")  # what put_chunk appends (an ObjectRef in Ray)
    claim.nbytes = 10
    return store.seal(ident, holder, [{"names": [["p", "", "w"]]}], "/ckpt")


def test_first_replica_fills_others_wait_then_map() -> None:
    store = WeightStore()
    assert store.lookup("m@1", "a", "m")["state"] == "fill"
    assert store.lookup("m@1", "b", "m")["state"] == "wait"  # a scale-up reads the disk once
    assert store.lookup("m@1", "a", "m")["state"] == "fill"  # the filler asking again keeps its claim
    sealed = _sealed(store, "m@1", "a", "m")
    assert sealed["state"] == "hit" and sealed["refs"] == ["ref-0"]
    hit = store.lookup("m@1", "b", "m")
    assert hit["state"] == "hit" and hit["checkpoint"] == "/ckpt" and hit["nbytes"] == 10


def test_a_lapsed_claim_passes_to_the_next_replica() -> None:
    store = WeightStore()
    store.lookup("m@1", "a", "m", fill_timeout_s=0.0)
    assert store.lookup("m@1", "b", "m")["state"] == "fill"
    with pytest.raises(RuntimeError, match="no fill"):
        store.seal("m@1", "a", [], "/ckpt")  # the old filler lost its claim


def test_eviction_and_replacement_by_a_new_identity() -> None:
    store = WeightStore()
    store.lookup("m@1", "a", "m")
    _sealed(store, "m@1", "a", "m")
    store.lookup("m@2", "a", "m")  # another revision of the same model
    _sealed(store, "m@2", "a", "m")
    assert [e["identity"] for e in store.contents()] == ["m@2"]
    store.lookup("n@1", "a", "n")
    _sealed(store, "n@1", "a", "n")
    assert store.evict_model("m") == 1
    assert [e["model_key"] for e in store.contents()] == ["n"]
    store.abandon("x@1", "nobody")  # no claim: nothing happens


def test_identity_changes_with_what_is_loaded() -> None:
    base = {"model_key": "m", "revision": "main", "dtype": "float32"}
    assert weight_store.identity(base) == weight_store.identity(dict(base))
    assert weight_store.identity(base) != weight_store.identity({**base, "dtype": "bfloat16"})
    assert weight_store.identity(base).startswith("m@")


def test_activation_estimate_is_start_up_without_the_disk_read_plus_the_copy() -> None:
    startup = {"process_started": 100.0, "loaded": 112.0}
    # 12 s to start and load, 5 s of it reading the checkpoint: 7 s start-up, 2 s copy, 2 s reaction.
    assert levels.activation_eta_s(startup, 5.0, 2_000_000_000) == pytest.approx(11.0)
    assert levels.activation_eta_s({}, 0.0, 0) == pytest.approx(12.0)  # unknown start-up: 10 s
    # Kept in place (a `reconfigure`): the reaction and the copy only.
    assert levels.activation_eta_s(startup, 5.0, 2_000_000_000, in_place=True) == pytest.approx(4.0)

"""Per-request garbage collection: cheap after the freeze, and request cycles are still freed."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from model_runtime.replica import garbage
from model_runtime.replica.garbage import collect_request_garbage, freeze_long_lived, release_frozen


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


@pytest.fixture
def frozen() -> Iterator[None]:
    freeze_long_lived()
    try:
        yield
    finally:
        release_frozen()


def test_freeze_moves_long_lived_objects_out_of_the_collected_generations(frozen: None) -> None:
    assert gc.get_freeze_count() > 1000  # this process holds torch, pydantic, pytest...


def test_a_request_cycle_is_freed_after_the_freeze(frozen: None) -> None:
    node = _Node()
    ref = weakref.ref(node)
    del node
    collect_request_garbage()
    assert ref() is None


def test_garbage_piled_up_in_the_oldest_generation_gets_a_full_collection(frozen: None) -> None:
    nodes = [_Node() for _ in range(garbage.FULL_COLLECTION_GEN2_OBJECTS + 1)]
    ref = weakref.ref(nodes[0])
    gc.collect()  # promoted to generation 2, as during a long request
    del nodes
    collect_request_garbage()
    assert ref() is None and len(gc.get_objects(generation=2)) < garbage.FULL_COLLECTION_GEN2_OBJECTS


def test_garbage_another_collection_moved_to_the_oldest_generation_is_counted(frozen: None) -> None:
    collect_request_garbage()
    nodes = [_Node() for _ in range(garbage.FULL_COLLECTION_GEN2_OBJECTS + 1)]
    ref = weakref.ref(nodes[0])
    gc.collect(1)  # the collector's own young collection during a long request: into generation 2
    del nodes
    collect_request_garbage()
    assert ref() is None


def test_survivors_of_young_collections_that_die_later_are_counted_periodically(frozen: None) -> None:
    collect_request_garbage()
    nodes = [_Node() for _ in range(garbage.FULL_COLLECTION_GEN2_OBJECTS + 1)]
    ref = weakref.ref(nodes[0])
    collect_request_garbage()  # alive: moved to generation 2 by the young collection itself
    del nodes
    for _ in range(garbage.GEN2_COUNT_EVERY):
        collect_request_garbage()
    assert ref() is None


def test_without_a_freeze_young_cycles_are_freed() -> None:
    release_frozen()
    node = _Node()
    ref = weakref.ref(node)
    del node
    collect_request_garbage()
    assert ref() is None


def test_release_makes_frozen_cycles_collectable() -> None:
    node = _Node()
    ref = weakref.ref(node)
    freeze_long_lived()
    del node
    gc.collect()
    assert ref() is not None  # frozen: invisible to the collector (why levels.drop releases first)
    release_frozen()
    gc.collect()
    assert ref() is None


def _collected(obj: object) -> bool:
    """Whether the collector still walks `obj` (False once it sits in the permanent generation)."""
    return any(o is obj for o in gc.get_objects())


def test_tp_shard_ranks_freeze_what_they_load_and_move(monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard rank (ranks >= 1 of a tensor-parallel replica) freezes its long-lived objects after
    a load and after a move that keeps weights, as rank 0 does: its per-request collections then
    walk only what requests made. Ranks run as Ray actors; here one runs in-process, its loading
    replaced by objects standing for a loaded and a moved shard."""
    from types import SimpleNamespace

    from model_runtime.replica import app
    from model_runtime.replica.parallel import shard_rank as ranks
    from runtime.conftest import model_args

    def held() -> SimpleNamespace:
        return SimpleNamespace(shard=SimpleNamespace(bytes_read=1, seconds=0.0), weights=[[0.0] * 4])

    made: list[SimpleNamespace] = []

    def make(*_: object) -> SimpleNamespace | None:
        made.append(held())
        return made[-1]

    monkeypatch.setattr(app, "_prepare_process", lambda: None)
    monkeypatch.setattr(ranks, "load_rank", make)
    monkeypatch.setattr(ranks, "move_rank", lambda current, where, device: make() if where != "cold" else None)
    rank = ranks.ShardRank(1, 2)
    try:
        assert _collected(rank)
        rank.load(model_args(Path("/models/tiny")), "/models/tiny")
        assert not _collected(made[0].weights) and not _collected(rank)  # frozen with everything else
        rank.move("cpu")
        assert not _collected(made[1].weights)  # the moved shard is new, and frozen too
        request_garbage = held()
        rank.move("cold")  # nothing held: nothing new to freeze
        assert rank.held is None and _collected(request_garbage.weights)
    finally:
        release_frozen()


def test_what_the_first_request_after_the_freeze_keeps_is_frozen_too(frozen: None) -> None:
    """Long-lived objects a first request makes (the sandbox's records, first-used caches) are
    frozen at its end, so the periodic counts find no pile in generation 2 and run no full
    collection that would free nothing; that request's garbage is still freed."""
    kept = [_Node() for _ in range(garbage.FULL_COLLECTION_GEN2_OBJECTS + 1)]  # made by the first request
    dead = _Node()
    ref = weakref.ref(dead)
    del dead
    full: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "stop" and info["generation"] == 2:
            full.append(info["collected"])

    gc.callbacks.append(count)
    try:
        collect_request_garbage()  # the first request's end
        assert ref() is None and len(full) == 1
        assert len(gc.get_objects(generation=2)) < garbage.FULL_COLLECTION_GEN2_OBJECTS
        for _ in range(3 * garbage.GEN2_COUNT_EVERY):
            collect_request_garbage()
        assert len(full) == 1  # (kept in generation 2: one fruitless full collection per count)
    finally:
        gc.callbacks.remove(count)
        del kept

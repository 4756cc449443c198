"""Per-request garbage collection: cheap after the freeze, and request cycles are still freed."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

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

"""Per-request garbage collection: cheap after the freeze, and request cycles are still freed."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from model_runtime.garbage import collect_request_garbage, freeze_long_lived, release_frozen


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
    gc.collect()  # even promoted to the oldest generation...
    ref = weakref.ref(node)
    del node
    collect_request_garbage()  # ...the per-request collection (a full one, after the freeze) frees it
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

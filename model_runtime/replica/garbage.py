"""Garbage collection around requests, tuned for a process that holds a model.

A replica holds hundreds of thousands of long-lived objects (torch, transformers, nnsight, Ray,
the model's modules). A full `gc.collect()` walks all of them: about 190 ms in a process with
~450k of them (bench/runtime.py, "gc"), more than a small request itself. NDIF's answer, used here too: once a
model is loaded or has moved level, collect once and `gc.freeze()` what survives, so those objects
sit in the permanent generation and later collections only walk what requests created. Per
request only the young generations are collected (see `collect_request_garbage`).
"""

from __future__ import annotations

import gc


def freeze_long_lived() -> None:
    """Collect, then move every surviving object out of the collected generations (after a load/move).

    The first request after it makes long-lived objects of its own (the sandbox's records of the
    model's weights and module tree, caches of the libraries it uses first): ~67k on the tiny
    model. Left in generation 2, every periodic count below would find more than
    `FULL_COLLECTION_GEN2_OBJECTS` there and run a full collection that frees nothing (35 ms on the
    tiny model, every `GEN2_COUNT_EVERY` requests), so they are frozen too, once, at the end of
    that first request (`collect_request_garbage`)."""
    global _freeze_after_next
    gc.collect()
    gc.freeze()
    _freeze_after_next = True


def release_frozen() -> None:
    """Give frozen objects back to the collector (before dropping a model: its cycles must be found)."""
    global _freeze_after_next
    gc.unfreeze()
    _freeze_after_next = False


# A full collection costs ~30 ms here even with everything frozen and generation 2 empty (fixed
# costs of a full pass in CPython 3.11), so it runs only once this many objects piled up in
# generation 2 since the freeze (request garbage promoted there during a long request).
FULL_COLLECTION_GEN2_OBJECTS = 20_000
# Counting generation 2 walks it (tens of microseconds for a thousand objects). Request garbage
# reaches it only through a collection of generation 1 other than ours (the collector's own, when a
# request allocates a lot), which moves the collector's count of them (`gc.get_count()[2]`), so it
# is counted then; otherwise generation 2 grows only by what our young collections found alive,
# counted every this many requests.
GEN2_COUNT_EVERY = 32

_since_counted = 0
_gen1_collections_after_ours = -1  # `gc.get_count()[2]` right after our last young collection
_freeze_after_next = False  # the first request after a freeze ends with one (see freeze_long_lived)


def collect_request_garbage() -> None:
    """Free the cycles a request left (tensors held by nnsight's graph), cheaply.

    The young generations hold what the request made (microseconds to collect). A full collection
    runs only when generation 2 has grown large; with long-lived objects frozen that generation
    holds only what requests left behind. It is counted when another collection may have moved
    request garbage there since our last one, and every `GEN2_COUNT_EVERY` requests.
    """
    global _since_counted, _gen1_collections_after_ours, _freeze_after_next
    if _freeze_after_next:
        _freeze_after_next = False
        gc.collect()  # the request's own garbage first: only what outlives it is frozen
        gc.freeze()
        _gen1_collections_after_ours = gc.get_count()[2]
        return
    moved = gc.get_count()[2] != _gen1_collections_after_ours
    gc.collect(1)
    _since_counted += 1
    if moved or _since_counted >= GEN2_COUNT_EVERY:
        _since_counted = 0
        if len(gc.get_objects(generation=2)) > FULL_COLLECTION_GEN2_OBJECTS:
            gc.collect()
    _gen1_collections_after_ours = gc.get_count()[2]

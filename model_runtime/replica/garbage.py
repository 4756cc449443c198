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
    """Collect, then move every surviving object out of the collected generations (after a load/move)."""
    gc.collect()
    gc.freeze()


def release_frozen() -> None:
    """Give frozen objects back to the collector (before dropping a model: its cycles must be found)."""
    gc.unfreeze()


# A full collection costs ~30 ms here even with everything frozen and generation 2 empty (fixed
# costs of a full pass in CPython 3.11), so it runs only once this many objects piled up in
# generation 2 since the freeze (request garbage promoted there during a long request).
FULL_COLLECTION_GEN2_OBJECTS = 20_000


def collect_request_garbage() -> None:
    """Free the cycles a request left (tensors held by nnsight's graph), cheaply.

    The young generations hold what the request made (microseconds to collect). A full collection
    runs only when generation 2 has grown large; with long-lived objects frozen that generation
    holds only what requests left behind, so counting it is cheap too.
    """
    gc.collect(1)
    if len(gc.get_objects(generation=2)) > FULL_COLLECTION_GEN2_OBJECTS:
        gc.collect()

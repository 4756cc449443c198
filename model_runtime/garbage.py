"""Garbage collection around requests, tuned for a process that holds a model.

A replica holds hundreds of thousands of long-lived objects (torch, transformers, nnsight, Ray,
the model's modules). A full `gc.collect()` walks all of them: about 210 ms here for a tiny model
(bench/runtime.py, "gc"), far more than the request itself. NDIF's answer, used here too: once a
model is loaded or has moved level, collect once and `gc.freeze()` what survives, so those objects
sit in the permanent generation and later collections only walk what requests created.
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


def collect_request_garbage() -> None:
    """Free the cycles a request left (tensors held by nnsight's graph), cheaply.

    With long-lived objects frozen, a full collection only walks what was made since the freeze.
    Without a freeze (a runner used outside a replica), a full one would walk everything, so only
    the young generations are collected; older garbage waits for Python's own threshold runs.
    """
    gc.collect(2 if gc.get_freeze_count() else 1)

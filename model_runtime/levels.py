"""HOT / WARM / COLD for one replica's model: where its weights live, and moving between levels.

HOT: on the granted device, serving. WARM: the built model sits in CPU RAM, so becoming HOT is a
copy to the device: no disk or object-store read and nothing built from scratch. COLD: nothing
resident; becoming HOT loads from the source again (`loading.load_model`).

On a CPU-only node the HOT device *is* CPU RAM, so WARM → HOT moves nothing; the transition is
still timed so cold and warm activation can be compared (bench/runtime.py).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any

from model_runtime.garbage import release_frozen

HOT, WARM, COLD = "Hot", "Warm", "Cold"
LEVELS = (HOT, WARM, COLD)


@dataclass(frozen=True)
class Transition:
    from_level: str
    to_level: str
    seconds: float
    source: str  # "resident" (already there), "memory" (WARM → HOT), or the load source kind


def limit_gpu_share(gpus: float) -> None:
    """A fractional grant shares one GPU: cap this process's allocator to its share."""
    import torch

    if 0 < gpus < 1 and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(gpus)


def move_module(model: Any, device: str) -> None:
    """Move the wrapped torch module; free the device cache when leaving a GPU."""
    import torch

    model._module.to(device)
    if device == "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def drop(model: Any) -> None:
    """Release what we can of a model that goes COLD (the caller drops its last reference)."""
    import torch

    model._module.to("meta")
    release_frozen()  # its frozen objects (and their cycles) must be collectable again
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed(from_level: str, to_level: str, source: str, started: float) -> Transition:
    return Transition(from_level, to_level, time.monotonic() - started, source)

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

from model_runtime.replica.garbage import release_frozen

HOT, WARM, COLD = "Hot", "Warm", "Cold"
LEVELS = (HOT, WARM, COLD)


@dataclass(frozen=True)
class Transition:
    from_level: str
    to_level: str
    seconds: float
    source: str  # "resident" (already there), "memory" (WARM → HOT), or the load source kind
    started_at: float = 0.0  # epoch seconds (bench/runtime.py: config PUT → the move began)
    copy_seconds: float = 0.0  # of `seconds`, the weights' copy itself (the rest: gc freeze, guards)


def process_started_at() -> float:
    """Epoch seconds when this process started, to ~10 ms (0.0 when unknown).

    From /proc: the process's start in clock ticks since boot against the system's uptime now
    (psutil's create_time rounds the boot time to whole seconds)."""
    try:
        import os

        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        started_after_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        uptime = float(open("/proc/uptime").read().split()[0])
        return time.time() - (uptime - started_after_boot)
    except (OSError, ValueError, IndexError):
        return 0.0


# What an activation costs besides this replica's own start-up: the operator's re-plan and PUT, and
# Serve starting the replacement replica.
ACTIVATION_REACTION_S = 2.0
HOST_COPY_BYTES_PER_S = 1e9  # a conservative host → device (or memcpy) rate for the estimate


def activation_eta_s(startup: dict[str, float], source_load_seconds: float, weights_bytes: int,
                     *, in_place: bool = False) -> float:
    """How long a WARM model takes to serve once activation is requested (the 503's Retry-After).

    In place (`reconfigure` keeps this replica): the copy to the device. Otherwise the replacement
    replica starts like this one did (process, imports, skeleton), minus this one's read of the
    checkpoint (the new one maps the node's copy), plus the copy to the device.
    """
    began, loaded = startup.get("process_started", 0.0), startup.get("loaded", 0.0)
    start_up = max(0.0, loaded - began - source_load_seconds) if began > 0 and loaded > began else 10.0
    if in_place:
        start_up = 0.0
    return ACTIVATION_REACTION_S + start_up + weights_bytes / HOST_COPY_BYTES_PER_S


def activates_in_place() -> bool:
    """Whether WARM → HOT is expected to keep this replica: the operator renders the two levels
    alike (a `reconfigure`) where there is no GPU to ask Ray for, and for a pinned replica whose
    HOT slot is on its pod (it leases its GPU share; docs/runtime.md). A pinned node carries the
    pod label."""
    import torch

    if not torch.cuda.is_available():
        return True
    try:
        import ray

        from ndif_operator.api.pinning import POD_LABEL

        return ray.is_initialized() and POD_LABEL in ray.get_runtime_context().get_node_labels()
    except Exception:  # no Ray context: assume a replacement (the longer wait)
        return False


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


def free_device_cache() -> None:
    """Give a GPU's cached blocks back after the replica's tensors there were dropped."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def drop(model: Any) -> None:
    """Release what we can of a model that goes COLD (the caller drops its last reference)."""
    import torch

    model._module.to("meta")
    release_frozen()  # its frozen objects (and their cycles) must be collectable again
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed(from_level: str, to_level: str, source: str, started: float, copy_seconds: float = 0.0) -> Transition:
    seconds = time.monotonic() - started
    return Transition(from_level, to_level, seconds, source, time.time() - seconds, copy_seconds)

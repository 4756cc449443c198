"""Bind a replica (or tensor-parallel rank) process to the GPU the planner pinned it to.

A pinned replica asks Ray for `num_gpus: 0` and for its share of a per-GPU custom resource
(`ndif_gpu_<i>`, ndif_operator.api.pinning), so Ray does not set CUDA_VISIBLE_DEVICES for it.
Before CUDA is initialised the process reads its own grant and makes GPU i its only visible
device: `cuda:0` is then the planned GPU, and the allocator cap (`levels.limit_gpu_share`)
applies to it.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Any

from ndif_operator.api.pinning import pinned_gpu_index


def assigned_resources() -> dict[str, float]:
    """This Ray worker's granted resources (empty outside Ray)."""
    import ray

    if not ray.is_initialized():
        return {}
    context: Any = ray.get_runtime_context()  # untyped in ray
    return dict(context.get_assigned_resources())


def bind_pinned_gpu(resources: dict[str, float] | None = None,
                    env: MutableMapping[str, str] | None = None) -> int | None:
    """Make the pinned GPU the process's only CUDA device; return its index (None: not pinned).

    Must run before the first CUDA call (CUDA reads CUDA_VISIBLE_DEVICES once, at init).
    """
    env = os.environ if env is None else env
    index = pinned_gpu_index(assigned_resources() if resources is None else resources)
    if index is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(index)
    return index


def rank_actor_options(bundle: dict[str, float]) -> dict[str, object]:
    """Ray actor options for the tensor-parallel rank placed in `bundle` (a placement group bundle
    spec): exactly the bundle's resources, so the rank's pinned `ndif_gpu_<i>` share (or its
    unpinned GPU share) and CPU are its own; the rank then calls `bind_pinned_gpu()` first thing."""
    custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU", "memory")}
    options: dict[str, object] = {"num_cpus": bundle.get("CPU", 0), "num_gpus": bundle.get("GPU", 0)}
    if custom:
        options["resources"] = custom
    return options

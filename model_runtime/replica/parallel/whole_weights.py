"""Weights read inside a trace on a tensor-parallel model are whole and read-only, as on one device.

    install_whole_weights()   # once per rank process, before it serves requests

Under transformers tensor parallelism a sharded parameter is a DTensor holding this rank's slice,
and nnsight hands module attributes over as they are (`model.lm_head.weight` is that DTensor):
mixing it with plain tensors fails, and its local values differ per rank. A request's envoys are
the client's own (deserialised, re-pointed at the served modules), so the server cannot choose
their class: instead the fall-through that reads a module attribute through any envoy
(`Envoy.__getattr__`) returns a sharded parameter gathered (`DTensor.full_tensor()`, one
all-gather; every rank runs the same request, so every rank gathers at the same point). The
gathered tensor is a copy, a frozen `Parameter` like the weight on one device (the sandbox's
Python-level rules for weights cover it), and is added to the request's write guard
(`model_runtime.sandbox.dispatch_guard.guard_also`), so an in-place write into it is refused as a
write into a weight is on one device. Anything that is not a DTensor passes through untouched,
so the patch changes nothing for single-device models in the same process.
"""

from __future__ import annotations

from typing import Any

import torch
from nnsight.intervention.envoy import Envoy


def whole_if_sharded(value: Any) -> Any:
    """`value` gathered whole when it is a DTensor, else unchanged.

    The copy is a frozen `Parameter`, as the weight is on one device, so the sandbox's Python-level
    rules for weights apply to it as well as the write guard."""
    from torch.distributed.tensor import DTensor

    if not isinstance(value, DTensor):
        return value
    with torch.no_grad():
        whole = torch.nn.Parameter(value.full_tensor(), requires_grad=False)
    from model_runtime.sandbox.dispatch_guard import guard_also

    guard_also([whole])
    return whole


def install_whole_weights() -> None:
    """Make the envoy attribute fall-through gather sharded parameters (idempotent)."""
    if getattr(Envoy.__getattr__, "_gathers_dtensors", False):
        return
    original = Envoy.__getattr__

    def __getattr__(self: Envoy, name: str) -> Any:
        return whole_if_sharded(original(self, name))

    __getattr__._gathers_dtensors = True  # type: ignore[attr-defined]
    Envoy.__getattr__ = __getattr__

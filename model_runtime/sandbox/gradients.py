"""Gradients for requests that ask for them, without unfreezing the served weights.

The replica loads its model with `requires_grad=False` on every parameter: a forward then builds
no autograd graph (no saved activations, no parameter `.grad` the size of the model), which is
what almost every request wants. A request that runs a backward pass (`with loss.backward():`,
attribution patching) needs activations that require grad: while such a request runs, the input
embedding's weight (only it) requires grad, so the embedding's output and every activation after
it carry a graph. Its `.grad` (one embedding-sized tensor, allocated only if the backward pass
reaches it) is dropped and the flag reset when the request ends; no other weight's flag or
`.grad` changes. (Marking the embedding's *output* instead would hide it from nnsight, which
reads a module's output before any forward hook runs.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


def wants_gradients(payload: bytes) -> bool:
    """Whether a (decompressed) payload's source can run a backward pass.

    The block and every shipped function travel as source text inside the pickle, and a backward
    pass needs the word `backward` in it (the sandbox's `getattr` refuses nothing here, but a
    built-up name is still spelled somewhere in the text). This decides cost only, never safety:
    a request that evades it just gets no gradients.
    """
    return b"backward" in payload


@contextlib.contextmanager
def activations_require_grad(model: Any, enabled: bool) -> Iterator[None]:
    """While active, the input embedding's weight requires grad, so its output and every
    activation after it carry a graph; afterwards its `.grad` is dropped and the flag reset."""
    if not enabled:
        yield
        return
    weight = model._module.get_input_embeddings().weight
    was = weight.requires_grad
    weight.requires_grad_(True)
    try:
        yield
    finally:
        weight.grad = None
        weight.requires_grad_(was)

"""Gradients for requests that ask for them, without unfreezing the served weights.

The replica loads its model with `requires_grad=False` on every parameter: a forward then builds
no autograd graph (no saved activations, no parameter `.grad` the size of the model), which is
what almost every request wants. A request that runs a backward pass (`with loss.backward():`,
attribution patching) needs activations that require grad, not weights: while such a request
runs, the input embedding's output is marked `requires_grad`, so every activation after it
carries a graph and gradients stop there. The weights' flags and `.grad` never change.
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
    """While active, the input embedding's output requires grad (when grad mode is on)."""
    if not enabled:
        yield
        return
    import torch

    embeddings = model._module.get_input_embeddings()

    def mark(_module: Any, _inputs: Any, output: Any) -> Any:
        if (isinstance(output, torch.Tensor) and torch.is_grad_enabled() and output.is_floating_point()
                and not output.requires_grad):
            return output.detach().requires_grad_(True)
        return None

    handle = embeddings.register_forward_hook(mark)
    try:
        yield
    finally:
        handle.remove()

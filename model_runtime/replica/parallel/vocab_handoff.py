"""A vocabulary-parallel embedding's input and output read and edit whole, as on one device.

    install_vocab_handoff()   # once per rank process, before it serves requests

transformers shards every base model's `embed_tokens` by vocabulary rows (`embedding_rowwise`,
added to any plan that does not name it). nnsight 0.8.1 shows users two wrong things there:

- **The output** is a DTensor whose placement is torch's `_MaskPartial`: each rank's rows for the
  ids it does not hold must be zeroed before the ranks' terms are summed, and the mask that says
  which rows lives *inside the placement*, released by the first reduction. nnsight assembles a
  value that carries its own placement with `full_tensor()` (which spends that mask) and hands back
  a new DTensor around the same, spent placement; the module's own output transform then reduces
  it again and torch raises a bare `AssertionError` on every rank.
- **The input** (the token ids) has no rule, so it reaches the user as the `Replicate` DTensor the
  style's input transform made of it, not as a tensor.

Here the embedding's input gets a rule too, and a handoff value whose DTensors are all `Replicate`
or `_MaskPartial` is made whole by `redistribute` to `Replicate` (for the output that is the mask
and the all-reduce the output transform would have done: one collective, issued at the same point
by every rank, which all run the same request; for the input, nothing). The (possibly edited)
whole goes back as a `Replicate` DTensor, which the embedding's body takes as its input and its
output transform passes through unreduced: no collective is added, the module's own reduce moved
here. Every other value goes to nnsight's rules unchanged, so nothing changes for other styles or
for single-device models in the same process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from nnsight.modeling.tp.fragments import TPFragments
from nnsight.util import apply


def _tensors(value: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        found.append(tensor)
        return tensor

    apply(value, keep, torch.Tensor)
    return found


def replicable_mesh(value: Any) -> Any:
    """The mesh of `value` when every tensor in it is a DTensor that `Replicate` makes whole without
    knowing a shard axis (`Replicate` itself, or a vocabulary lookup awaiting its masked reduction,
    `_MaskPartial`), all on one mesh; else None."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.placement_types import _MaskPartial

    tensors = _tensors(value)
    if not tensors or not all(isinstance(t, DTensor) and len(t.placements) == 1
                              and isinstance(t.placements[0], (Replicate, _MaskPartial)) for t in tensors):
        return None
    meshes = {t.device_mesh for t in tensors if isinstance(t, DTensor)}
    return meshes.pop() if len(meshes) == 1 else None


def reduced_whole(value: Any, mesh: Any) -> tuple[Any, Callable[[Any], Any]]:
    """`value` reduced whole (plain tensors), and the way back: the edited whole as `Replicate` DTensors."""
    from torch.distributed.tensor import DTensor, Replicate

    def whole(tensor: torch.Tensor) -> torch.Tensor:
        assert isinstance(tensor, DTensor)
        return tensor.redistribute(placements=[Replicate()]).to_local()

    def back(edited: Any) -> Any:
        return apply(edited, lambda t: t if isinstance(t, DTensor)
                     else DTensor.from_local(t, mesh, [Replicate()], run_check=False), torch.Tensor)

    return apply(value, whole, torch.Tensor), back


VOCAB_PARALLEL = "embedding_rowwise"


def install_vocab_handoff() -> None:
    """Give vocabulary-parallel embeddings' inputs a rule, and make such values whole by `Replicate`
    instead of nnsight's single-use reassembly (idempotent)."""
    if getattr(TPFragments.whole, "_reduces_masked_lookups", False):
        return
    original_whole, original_instrument = TPFragments.whole, TPFragments.instrument

    def instrument(self: TPFragments, envoy: Any) -> None:
        original_instrument(self, envoy)
        style, mesh = self.style_at(envoy.path)
        if style == VOCAB_PARALLEL:
            from torch.distributed.tensor import Replicate

            self.tp_rules[f"{envoy.path}.input"] = (mesh, Replicate())

    def whole(self: TPFragments, location: str, value: Any) -> tuple[Any, Any]:
        mesh = replicable_mesh(value)
        if mesh is None:
            found: tuple[Any, Any] = original_whole(self, location, value)
            return found
        return reduced_whole(value, mesh)

    whole._reduces_masked_lookups = True  # type: ignore[attr-defined]
    TPFragments.instrument = instrument
    TPFragments.whole = whole

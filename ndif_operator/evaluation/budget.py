"""The runtime budget: what a replica needs on top of its weights to serve traces.

Derived from the model's shape and the deployment's limits (max batch B, max sequence S, capped at
the model's own maximum positions since no request can be longer), in
the requested dtype's element size `e`. Every term is an upper bound for one forward pass over a
full batch (docs/placement.md explains each and compares with measured memory):

- KV cache: 2 · layers · kv_heads · head_dim · B · S · e (HF forward builds a cache by default);
- working activations of one layer: B · S · (4 · hidden + 4 · intermediate) · e (residual, norm,
  attention output; the MLP's up, gate, activation and product), plus one layer's attention scores
  B · heads · S · S · (e + 4) (the eager path materialises them and takes the softmax in float32);
- logits: B · S · vocab · 4 (float32: most heads upcast them, and so do users' `.save()`s);
- saved activations: every hidden state, (layers + 1) · B · S · hidden · e (an NNsight trace that
  saves each layer's output, the common interpretability pattern, or output_hidden_states);
- CUDA context and allocator slack: a constant per replica.
"""

from __future__ import annotations

from dataclasses import dataclass

from ndif_operator.api import RuntimeLimits
from ndif_operator.evaluation.shape import ModelShape

CUDA_CONTEXT_BYTES = 512 * 1024**2


@dataclass(frozen=True, slots=True)
class Budget:
    kv_cache: int
    activations: int
    logits: int
    saved: int
    context: int

    @property
    def total(self) -> int:
        return self.kv_cache + self.activations + self.logits + self.saved + self.context


def runtime_budget(shape: ModelShape, limits: RuntimeLimits, element_size: int) -> Budget:
    b, s, e = limits.max_batch_size, limits.max_sequence_length, element_size
    if shape.max_positions:
        s = min(s, shape.max_positions)
    tokens = b * s
    return Budget(
        kv_cache=2 * shape.num_layers * shape.num_key_value_heads * shape.head_dim * tokens * e,
        activations=tokens * (4 * shape.hidden_size + 4 * shape.intermediate_size) * e
        + b * shape.num_attention_heads * s * s * (e + 4),
        logits=tokens * shape.vocab_size * 4,
        saved=(shape.num_layers + 1) * tokens * shape.hidden_size * e,
        context=CUDA_CONTEXT_BYTES,
    )

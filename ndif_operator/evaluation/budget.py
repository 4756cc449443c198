"""The runtime budget: what one rank of a replica needs on top of its weights to serve traces.

Derived from the model's shape and the deployment's request limits: max batch B, max sequence S
(capped at the model's own maximum positions: no request can be longer), `maxResultBytes` R; T =
B * S tokens, `e` the element size of the dtype the model computes in, k the tensor-parallel size.
It is the peak of one forward pass over a full batch, the pass nnsight runs for a trace
(docs/placement.md compares it with memory measured through the replica's own trace path):

    kv_cache + saved + constants + max(layer, head) + context

Held for the whole pass:
- kv_cache: 2 * layers * kv_heads * head_dim * T * e (the forward builds a cache by default);
  split over ranks (each holds its kv heads);
- saved: what the trace's `.save()`s keep alive, every hidden state (layers + 1) * T * hidden * e
  (the common interpretability pattern), but never more than R: a request cannot return more,
  and the replica's memory cap stops one that tries. Whole tensors on every rank (nnsight shows
  user code whole tensors), so replicated;
- constants: RoPE cos/sin (2 * T * head_dim * e) and the attention mask: none for SDPA on an
  unpadded batch, a boolean B * S^2 when a batch of several prompts is padded (transformers then
  hands SDPA a mask); a float B * S^2 * e under eager attention. Replicated.

Working memory, of which only the larger phase exists at once:
- layer: one decoder layer's temporaries. The residual stream and its norm (full hidden size on
  every rank; float32 while normalising), then attention (queries, keys and values, RoPE
  temporaries, keys/values repeated for grouped heads, the output and its contiguous copy: 5 query
  widths and 2 key widths) or the MLP (activation, up projection and their product, 3
  intermediate widths), split over ranks. Under eager attention the score matrix too,
  B * heads * S^2 * (e + 4), the softmax taken in float32 (plus its cast back for 2-byte dtypes);
- head: the final norm's output and the logits, T * vocab * e (transformers 5 computes them in
  the model's dtype). On k > 1 ranks the lm_head is split and every rank holds 3 + 1/k logits at
  the peak: its 1/k shard, nnsight's whole copy for the trace (it all-gathers the shard when user
  code touches the logits), and the lm_head's own all-gather (its buffers and the gathered
  result); measured at 3.5 for k = 2 (bench/budget.py).

Per rank, what is split (weights except the input embedding and norms, KV cache, heads, MLP width)
divides by k; what is replicated (the residual stream, saved values, the gathered logits) does
not: `rank_bytes` is the figure the planner sizes a rank's GPU share with, for every
tensor-parallel size.

The CUDA context and allocator slack: a constant per rank (each rank is its own process).
"""

from __future__ import annotations

from dataclasses import dataclass

from ndif_operator.api import RuntimeLimits
from ndif_operator.api.attention import Attention
from ndif_operator.evaluation.shape import ModelShape

CUDA_CONTEXT_BYTES = 512 * 1024**2
# Float32 bytes per hidden element while a norm runs (its float32 copy and the normalised product).
_NORM_BYTES = 8


@dataclass(frozen=True, slots=True)
class Budget:
    """One rank's runtime memory by term (bytes); `total` is what it needs beyond its weights."""

    kv_cache: int
    saved: int
    constants: int
    layer: int
    head: int
    context: int

    @property
    def working(self) -> int:
        return max(self.layer, self.head)

    @property
    def total(self) -> int:
        return self.kv_cache + self.saved + self.constants + self.working + self.context


def _split(n: int, ranks: int) -> int:
    return -(-n // ranks)


def request_tokens(shape: ModelShape, limits: RuntimeLimits) -> tuple[int, int]:
    """(B, S) the budget is sized for: the limits, S capped at the model's own maximum."""
    s = limits.max_sequence_length
    if shape.max_positions:
        s = min(s, shape.max_positions)
    return limits.max_batch_size, s


def runtime_budget(shape: ModelShape, limits: RuntimeLimits, element_size: int, *, ranks: int = 1) -> Budget:
    """The budget of one of `ranks` tensor-parallel ranks (1: an unsplit replica). Pure."""
    b, s = request_tokens(shape, limits)
    return forward_budget(shape, b, s, element_size, max_result_bytes=limits.max_result_bytes, ranks=ranks)


def forward_budget(shape: ModelShape, batch: int, sequence: int, element_size: int, *,
                   max_result_bytes: int, ranks: int = 1, attention: Attention | None = None) -> Budget:
    """The peak of one forward pass over `batch` x `sequence` tokens (see the module doc)."""
    b, s, e, k = batch, sequence, element_size, ranks
    t = b * s
    attention = attention or Attention(shape.attention)
    h, hd = shape.hidden_size, shape.head_dim
    heads, kv_heads = shape.num_attention_heads, shape.num_key_value_heads
    eager = attention == Attention.EAGER
    # Residual stream, norm output, and the norm's float32 temporaries: full width on every rank.
    stream = t * h * (2 * e + _NORM_BYTES)
    attention_bytes = _split(t * (5 * heads + 2 * kv_heads) * hd * e, k)
    if eager:
        score_bytes = e + 4 + (e if e < 4 else 0)  # scores, float32 softmax, cast back
        attention_bytes += _split(b * heads * s * s * score_bytes, k)
    mlp_bytes = _split(3 * t * shape.intermediate_size * e, k)
    if eager:
        mask = b * s * s * e
    elif b > 1:
        mask = b * s * s
    else:
        mask = 0
    logits = t * shape.vocab_size * e
    return Budget(
        kv_cache=_split(2 * shape.num_layers * kv_heads * hd * t * e, k),
        saved=min((shape.num_layers + 1) * t * h * e, max_result_bytes),
        constants=2 * t * hd * e + mask,
        layer=stream + max(attention_bytes, mlp_bytes),
        head=t * h * (e + _NORM_BYTES) + logits + (2 * logits + _split(logits, k) if k > 1 else 0),
        context=CUDA_CONTEXT_BYTES,
    )


def replicated_weight_bytes(shape: ModelShape, element_size: int) -> int:
    """Weights every rank holds whole: the input embedding and the norms (TP plans split the
    projections and the lm_head)."""
    return (shape.vocab_size + (2 * shape.num_layers + 1)) * shape.hidden_size * element_size


def rank_bytes(shape: ModelShape, limits: RuntimeLimits, element_size: int, weights_bytes: int, ranks: int) -> int:
    """GPU memory one of `ranks` ranks needs: its part of the weights plus its budget."""
    budget = runtime_budget(shape, limits, element_size, ranks=ranks).total
    if ranks == 1:
        return weights_bytes + budget
    replicated = min(weights_bytes, replicated_weight_bytes(shape, element_size))
    return _split(weights_bytes - replicated, ranks) + replicated + budget

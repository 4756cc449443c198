"""Which attention implementation a replica runs: one rule for the runtime and the estimator.

The runtime loads every model with `attn_implementation=attention_implementation(config)` (read
from the checkpoint's config.json), and the estimator sizes the attention's working memory for the
same answer, so the budget describes the kernel that actually runs:

- `sdpa` (torch's scaled_dot_product_attention; flash or memory-efficient kernels on GPU, the
  flash kernel on CPU): no query x key score matrix is ever materialised. Transformers 5.22.2
  picks it whenever the model class supports it.
- `eager`: the score matrix and its float32 softmax exist for every head, B * heads * S^2
  elements. Only when the checkpoint forces it: its class has no SDPA path (the model type is not
  in `SDPA_MODEL_TYPES`, e.g. gemma2, gpt_neo, bloom, or remote code), or its config.json asks for
  eager (`attn_implementation`, or `output_attentions: true`, which needs the weights).

A request may still switch a model to another implementation for its own run (nnsight sends the
client's choice); the runtime checks such a request against the budget (docs/placement.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from ndif_operator.api.sdpa_model_types import SDPA_MODEL_TYPES


class Attention(StrEnum):
    SDPA = "sdpa"
    EAGER = "eager"


def _text(config: Mapping[str, Any]) -> Mapping[str, Any]:
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, Mapping) else config


def attention_implementation(config: Mapping[str, Any]) -> Attention:
    """The implementation a model with this config.json runs under the pinned transformers."""
    declared = config.get("attn_implementation", config.get("_attn_implementation"))
    if declared == Attention.EAGER or config.get("output_attentions") is True:
        return Attention.EAGER
    model_type = str(config.get("model_type") or _text(config).get("model_type") or "")
    return Attention.SDPA if model_type in SDPA_MODEL_TYPES else Attention.EAGER


def attention_of(config: Any) -> Attention:
    """The same rule over a loaded transformers config object (the runtime's view of config.json)."""
    return attention_implementation({
        "model_type": getattr(config, "model_type", ""),
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "output_attentions": bool(getattr(config, "output_attentions", False)),
    })

"""The few numbers of a model's config.json that the runtime budget needs.

Transformers configs name the same thing differently across architectures (`n_layer` in GPT-2,
`num_hidden_layers` in Llama ...); this module maps them to one shape. Multimodal configs keep
the language model in `text_config`, which is what traces run through.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ndif_operator.api.attention import Attention, attention_implementation

_ALIASES: dict[str, tuple[str, ...]] = {
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model", "dim"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "num_key_value_heads": ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "ffn_hidden_size"),
    "vocab_size": ("vocab_size", "n_vocab", "padded_vocab_size"),
    "head_dim": ("head_dim", "kv_channels"),
    "max_positions": ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"),
}


@dataclass(frozen=True, slots=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    torch_dtype: str | None = None  # the checkpoint's declared dtype, if any
    max_positions: int = 0  # longest sequence the model accepts; 0 = unknown
    model_type: str = ""  # config.json `model_type` (the text model's, for multimodal configs)
    attention: str = Attention.SDPA.value  # what the runtime loads it with (`api.attention`)


def _first_int(config: Mapping[str, Any], names: tuple[str, ...]) -> int | None:
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def shape_from_config(config: Mapping[str, Any]) -> ModelShape:
    """Read a ModelShape from a parsed config.json; raise ValueError when a core field is missing."""
    attention = attention_implementation(config)
    text = config.get("text_config")
    if isinstance(text, Mapping) and _first_int(text, _ALIASES["num_layers"]) is not None:
        merged = dict(config)
        merged.update(text)
        config = merged
    layers = _first_int(config, _ALIASES["num_layers"])
    hidden = _first_int(config, _ALIASES["hidden_size"])
    heads = _first_int(config, _ALIASES["num_attention_heads"])
    vocab = _first_int(config, _ALIASES["vocab_size"])
    missing = [
        n for n, v in (("layers", layers), ("hidden size", hidden), ("heads", heads), ("vocab", vocab)) if v is None
    ]
    if missing or layers is None or hidden is None or heads is None or vocab is None:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    kv_heads = _first_int(config, _ALIASES["num_key_value_heads"]) or heads
    head_dim = _first_int(config, _ALIASES["head_dim"]) or hidden // heads
    # GPT-2 leaves n_inner null meaning 4 * hidden; most others default to the same ratio.
    intermediate = _first_int(config, _ALIASES["intermediate_size"]) or 4 * hidden
    dtype = config.get("torch_dtype", config.get("dtype"))
    return ModelShape(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        vocab_size=vocab,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        torch_dtype=dtype if isinstance(dtype, str) else None,
        max_positions=_first_int(config, _ALIASES["max_positions"]) or 0,
        model_type=str(config.get("model_type") or ""),
        attention=attention.value,
    )

"""Exact weight bytes from safetensors headers: dtype conversion, tied embeddings, buffers.

What a loaded model holds is its parameters and buffers. The checkpoint stores the parameters
(once, even when tied) and the persistent buffers; this module adds what it does not store:

- dtype: loading with `dtype=bfloat16` casts every floating tensor (F64/F32/F16/BF16) to two bytes;
  integer, boolean and packed/FP8 tensors keep their size (HF loaders do not cast them);
- tied embeddings: a checkpoint written outside `save_pretrained` may hold both the input
  embedding and `lm_head`; with `tie_word_embeddings` they are one tensor in memory;
- non-persistent buffers: RoPE models compute `inv_freq` and `original_inv_freq` (float32,
  rotary_dim / 2 each) at construction; they are in `model.buffers()` but not in the file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ndif_operator.api import DType
from ndif_operator.evaluation.safetensors_header import CONVERTIBLE, DTYPE_SIZES, TensorInfo

DTYPE_BYTES: dict[DType, int] = {DType.FLOAT32: 4, DType.FLOAT16: 2, DType.BFLOAT16: 2}
_OUTPUT_EMBEDDINGS = ("lm_head.weight", "embed_out.weight")
_INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight")
_ROPE_KEYS = ("rope_theta", "rope_parameters", "rope_scaling", "rotary_pct", "rotary_emb_base", "rotary_dim")


@dataclass(frozen=True, slots=True)
class Weights:
    bytes: int
    parameters: int  # elements counted (tied tensors once), buffers excluded
    element_size: int  # bytes per element of the dtype the model computes in


def _tied(config: Mapping[str, Any]) -> bool:
    text = config.get("text_config")
    if isinstance(text, Mapping) and "tie_word_embeddings" in text:
        return bool(text["tie_word_embeddings"])
    # transformers' PretrainedConfig defaults to tied embeddings when the key is absent.
    return bool(config.get("tie_word_embeddings", True))


def _untied(tensors: Sequence[TensorInfo], config: Mapping[str, Any]) -> list[TensorInfo]:
    if not _tied(config):
        return list(tensors)
    inputs = [t for t in tensors if t.name.endswith(_INPUT_EMBEDDINGS)]
    if not inputs:
        return list(tensors)
    sizes = {t.numel for t in inputs}
    return [t for t in tensors if not (t.name.endswith(_OUTPUT_EMBEDDINGS) and t.numel in sizes)]


def rope_bytes(rotary_dim: int) -> int:
    """The RoPE buffers a loaded model holds: `inv_freq` and `original_inv_freq`, float32."""
    return 2 * (rotary_dim // 2) * 4


def rope_buffer_bytes(config: Mapping[str, Any]) -> int:
    text = config.get("text_config")
    if isinstance(text, Mapping):
        config = {**config, **text}
    if not any(k in config for k in _ROPE_KEYS):
        return 0
    hidden, heads = config.get("hidden_size", config.get("n_embd")), config.get(
        "num_attention_heads", config.get("n_head")
    )
    head_dim = config.get("head_dim") or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int) else 0)
    if not isinstance(head_dim, int) or head_dim <= 0:
        return 0
    if isinstance(config.get("rotary_dim"), int):
        rotary = int(config["rotary_dim"])
    else:
        params = config.get("rope_parameters")
        factor = config.get("partial_rotary_factor", config.get("rotary_pct"))
        if factor is None and isinstance(params, Mapping):
            factor = params.get("partial_rotary_factor")
        rotary = int(head_dim * float(factor)) if isinstance(factor, int | float) else head_dim
    return rope_bytes(rotary)


def weights_from_tensors(
    tensors: Sequence[TensorInfo], dtype: DType, config: Mapping[str, Any] | None
) -> Weights:
    config = config or {}
    counted = _untied(tensors, config)
    target = DTYPE_BYTES.get(DType(dtype))
    total = 0
    float_bytes: dict[str, int] = {}
    for t in counted:
        if t.dtype in CONVERTIBLE:
            float_bytes[t.dtype] = float_bytes.get(t.dtype, 0) + t.nbytes
            total += t.numel * target if target is not None else t.nbytes
        else:
            total += t.nbytes
    if target is not None:
        element = target
    elif float_bytes:
        # "auto": compute in the checkpoint's own dtype, i.e. the one holding most bytes.
        dominant = max(sorted(float_bytes), key=lambda d: float_bytes[d])
        element = int(DTYPE_SIZES[dominant])
    else:
        element = 2
    total += rope_buffer_bytes(config)
    return Weights(bytes=total, parameters=sum(t.numel for t in counted), element_size=element)

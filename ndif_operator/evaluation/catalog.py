"""A seed catalog of well-known models, for sizing without their checkpoints (plan previews, benches).

Each entry is the model's published parameter count and the config fields the runtime budget
needs. Weights are parameters x bytes per element of the requested dtype (plus RoPE's float32
buffers), so an entry is as exact as the parameter count; its method is `Config` to say that no
checkpoint header was read. A real evaluation (headers or meta device) always wins over it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from ndif_operator.api import DType, EstimateMethod, ModelSpec
from ndif_operator.api.attention import Attention
from ndif_operator.evaluation.cache import CacheEntry, cache_key
from ndif_operator.evaluation.shape import ModelShape
from ndif_operator.evaluation.weights import DTYPE_BYTES, rope_bytes

CATALOG_DATE = datetime(2026, 1, 1, tzinfo=UTC)  # when these counts were compiled


@dataclass(frozen=True, slots=True)
class KnownModel:
    repo_id: str
    parameters: int
    shape: ModelShape
    rope: bool = True
    checkpoint_dtype: DType = DType.BFLOAT16


def _shape(layers: int, hidden: int, heads: int, kv: int, inter: int, vocab: int, *, head_dim: int = 0,
           tied: bool = False, positions: int = 131072, attention: Attention = Attention.SDPA) -> ModelShape:
    return ModelShape(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
                      head_dim=head_dim or hidden // heads, intermediate_size=inter, vocab_size=vocab,
                      tie_word_embeddings=tied, max_positions=positions, attention=attention.value)


_LLAMA_8B = _shape(32, 4096, 32, 8, 14336, 128256)
_LLAMA_70B = _shape(80, 8192, 64, 8, 28672, 128256)

KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel("openai-community/gpt2", 124_439_808, _shape(12, 768, 12, 12, 3072, 50257, tied=True, positions=1024),
               rope=False, checkpoint_dtype=DType.FLOAT32),
    KnownModel("openai-community/gpt2-xl", 1_557_611_200,
               _shape(48, 1600, 25, 25, 6400, 50257, tied=True, positions=1024),
               rope=False, checkpoint_dtype=DType.FLOAT32),
    KnownModel("EleutherAI/pythia-1.4b", 1_414_647_808, _shape(24, 2048, 16, 16, 8192, 50304, positions=2048),
               checkpoint_dtype=DType.FLOAT16),
    KnownModel("EleutherAI/pythia-12b", 11_846_072_320, _shape(36, 5120, 40, 40, 20480, 50688, positions=2048),
               checkpoint_dtype=DType.FLOAT16),
    KnownModel("EleutherAI/gpt-j-6b", 6_053_381_344,
               _shape(28, 4096, 16, 16, 16384, 50400, positions=2048, attention=Attention.EAGER),
               checkpoint_dtype=DType.FLOAT32),
    KnownModel("meta-llama/Llama-3.2-1B", 1_235_814_400, _shape(16, 2048, 32, 8, 8192, 128256, tied=True)),
    KnownModel("meta-llama/Llama-3.2-3B", 3_212_749_824, _shape(28, 3072, 24, 8, 8192, 128256, tied=True)),
    KnownModel("meta-llama/Llama-3.1-8B", 8_030_261_248, _LLAMA_8B),
    KnownModel("meta-llama/Llama-3.1-8B-Instruct", 8_030_261_248, _LLAMA_8B),
    KnownModel("meta-llama/Llama-3.1-70B", 70_553_706_496, _LLAMA_70B),
    KnownModel("meta-llama/Llama-3.1-70B-Instruct", 70_553_706_496, _LLAMA_70B),
    KnownModel("meta-llama/Llama-3.3-70B-Instruct", 70_553_706_496, _LLAMA_70B),
    KnownModel("deepseek-ai/DeepSeek-R1-Distill-Llama-70B", 70_553_706_496, _LLAMA_70B),
    KnownModel("meta-llama/Llama-3.1-405B", 405_853_388_800, _shape(126, 16384, 128, 8, 53248, 128256)),
    KnownModel("meta-llama/Llama-3.1-405B-Instruct", 405_853_388_800, _shape(126, 16384, 128, 8, 53248, 128256)),
    KnownModel("mistralai/Mistral-7B-v0.1", 7_241_732_096, _shape(32, 4096, 32, 8, 14336, 32000, positions=32768)),
    KnownModel("google/gemma-2-2b", 2_614_341_888,
               _shape(26, 2304, 8, 4, 9216, 256000, head_dim=256, tied=True, positions=8192,
                      attention=Attention.EAGER),
               checkpoint_dtype=DType.FLOAT32),
    KnownModel("google/gemma-2-9b", 9_241_705_984,
               _shape(42, 3584, 16, 8, 14336, 256000, head_dim=256, tied=True, positions=8192,
                      attention=Attention.EAGER),
               checkpoint_dtype=DType.FLOAT32),
    KnownModel("Qwen/Qwen2.5-7B", 7_615_616_512, _shape(28, 3584, 28, 4, 18944, 152064, positions=32768)),
    KnownModel("Qwen/Qwen2.5-72B", 72_706_203_648, _shape(80, 8192, 64, 8, 29568, 152064, positions=32768)),
)
_BY_ID = {m.repo_id.lower(): m for m in KNOWN_MODELS}


def known_model(repo_id: str) -> KnownModel | None:
    return _BY_ID.get(repo_id.lower())


def catalog_weights(known: KnownModel, dtype: DType) -> tuple[int, int]:
    """(weight bytes, element size) of `known` loaded in `dtype`."""
    element = DTYPE_BYTES.get(DType(dtype)) or DTYPE_BYTES[known.checkpoint_dtype]
    rope = rope_bytes(known.shape.head_dim) if known.rope else 0
    return known.parameters * element + rope, element


def catalog_entry(model: ModelSpec) -> CacheEntry | None:
    """A cache entry for `model` from the catalog, or None when the model is not in it."""
    known = known_model(model.repo_id)
    if known is None:
        return None
    weights, element = catalog_weights(known, DType(model.dtype))
    return CacheEntry(
        key=cache_key(model),
        weights_bytes=weights,
        parameter_count=known.parameters,
        method=EstimateMethod.CONFIG.value,
        evaluated_at=CATALOG_DATE,
        shape=known.shape,
        element_size=element,
    )

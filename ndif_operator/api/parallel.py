"""Tensor parallelism as data: which sizes a model allows, its layout, and the project's TP plans.

`tensor_parallel_problems(shape, size)` is THE rule deciding whether a model can be split into
`size` tensor-parallel ranks. The planner asks it before placing a replica (an impossible size is
refused with its reason and never reaches Ray), the evaluator records the sizes it allows in
`status.estimate.parallel`, and the runtime builds a validated `ParallelDims` from it before it
loads a single weight. Pure: no torch, no transformers.

What makes a size impossible (transformers shards attention by head and the MLP by its
intermediate dimension, and its gathers assume equal pieces):
- the attention heads and the key/value heads must divide evenly (each rank holds whole heads);
- the MLP's intermediate size must divide evenly;
- the architecture needs a TP plan: the checkpoint's own `base_model_tp_plan` (transformers
  ships one for the model types in `TRANSFORMERS_TP_MODEL_TYPES`) or one of `PROJECT_TP_PLANS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from ndif_operator.api.tp_model_types import TRANSFORMERS_TP_MODEL_TYPES

CANDIDATE_SIZES = (1, 2, 4, 8)  # what the CRD accepts (`TENSOR_PARALLEL_SIZES`)


class TPStyle(StrEnum):
    """How one module is split. Names are transformers' (`ALL_PARALLEL_STYLES`) so a plan of ours
    and a checkpoint's own plan are the same kind of data; the layouts are in `STYLE_LAYOUTS`."""

    COLWISE = "colwise"
    ROWWISE = "rowwise"
    COLWISE_GATHER_OUTPUT = "colwise_gather_output"
    EMBEDDING_ROWWISE = "embedding_rowwise"
    REPLICATED = "replicated_with_grad_allreduce"


# style → (weight sharded along, what the module's output is on each rank).
STYLE_LAYOUTS: dict[TPStyle, tuple[str, str]] = {
    TPStyle.COLWISE: ("output features (weight dim 0, bias dim 0)", "shard of the last dim"),
    TPStyle.ROWWISE: ("input features (weight dim 1; bias replicated)", "replicated (all-reduced)"),
    TPStyle.COLWISE_GATHER_OUTPUT: ("output features", "replicated (all-gathered)"),
    TPStyle.EMBEDDING_ROWWISE: ("vocabulary rows", "replicated (all-reduced)"),
    TPStyle.REPLICATED: ("nothing (whole copy on every rank)", "replicated"),
}

_LLAMA_FAMILY: dict[str, TPStyle] = {
    "layers.*.self_attn.q_proj": TPStyle.COLWISE,
    "layers.*.self_attn.k_proj": TPStyle.COLWISE,
    "layers.*.self_attn.v_proj": TPStyle.COLWISE,
    "layers.*.self_attn.o_proj": TPStyle.ROWWISE,
    "layers.*.mlp.gate_proj": TPStyle.COLWISE,
    "layers.*.mlp.up_proj": TPStyle.COLWISE,
    "layers.*.mlp.down_proj": TPStyle.ROWWISE,
}

# Module-name pattern (relative to the base model, `*` = one path element) → style, per model type.
# Used when the checkpoint's config has no `base_model_tp_plan` of its own (transformers' wins when
# present: it is what its modelling code was written against; tests check that these entries equal
# transformers' plans where both exist). A family can only join this table if its modelling code
# reshapes by the local head count (`view(..., -1, head_dim)`): OPT, for one, reshapes by the global
# count and also ties its LM head to the embedding, so splitting it fails at the first forward.
# GPT-NeoX's fused query_key_value is laid out head by head ([heads, 3, head_dim]), so a colwise
# split keeps whole heads per rank.
PROJECT_TP_PLANS: dict[str, dict[str, TPStyle]] = {
    "llama": _LLAMA_FAMILY,
    "mistral": _LLAMA_FAMILY,
    "qwen2": _LLAMA_FAMILY,
    "gpt_neox": {
        "layers.*.attention.query_key_value": TPStyle.COLWISE,
        "layers.*.attention.dense": TPStyle.ROWWISE,
        "layers.*.mlp.dense_h_to_4h": TPStyle.COLWISE,
        "layers.*.mlp.dense_4h_to_h": TPStyle.ROWWISE,
    },
}


def has_tp_plan(model_type: str) -> bool:
    """Whether some plan (the checkpoint's via transformers, or ours) can split this model type."""
    return model_type in TRANSFORMERS_TP_MODEL_TYPES or model_type in PROJECT_TP_PLANS


class ParallelShape(BaseModel):
    """The few numbers of a model that decide how it can be split (`status.estimate.parallel`)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              serialize_by_alias=True)

    model_type: str = Field(default="", description="config.json `model_type`; empty = unknown.")
    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    tensor_parallel_sizes: list[int] = Field(
        default_factory=list, description="The tensorParallelSize values this model allows (derived)."
    )

    @classmethod
    def of(cls, model_type: str, heads: int, kv_heads: int, intermediate: int) -> ParallelShape:
        """A shape with its allowed sizes filled in by the one rule."""
        shape = cls(model_type=model_type, num_attention_heads=heads, num_key_value_heads=kv_heads,
                    intermediate_size=intermediate)
        shape.tensor_parallel_sizes = list(allowed_tensor_parallel_sizes(shape))
        return shape


def tensor_parallel_problems(shape: ParallelShape, size: int) -> list[str]:
    """Why `shape` cannot run on `size` tensor-parallel ranks; empty when it can."""
    if size < 1:
        return [f"tensor-parallel size must be >= 1, got {size}"]
    if size == 1:
        return []
    problems = []
    if shape.model_type and not has_tp_plan(shape.model_type):
        problems.append(f"model type {shape.model_type!r} has no tensor-parallel plan (neither transformers' "
                        "base_model_tp_plan nor the project's)")
    for count, what in ((shape.num_attention_heads, "attention heads"),
                        (shape.num_key_value_heads, "key/value heads"),
                        (shape.intermediate_size, "intermediate size (MLP width)")):
        if count % size:
            problems.append(f"{what} {count} is not divisible by {size}")
    return problems


def allowed_tensor_parallel_sizes(
    shape: ParallelShape, candidates: tuple[int, ...] = CANDIDATE_SIZES
) -> tuple[int, ...]:
    return tuple(k for k in candidates if not tensor_parallel_problems(shape, k))


def describe_problems(shape: ParallelShape, size: int) -> str:
    """One sentence for a refusal: what is wrong and which sizes would work."""
    problems = tensor_parallel_problems(shape, size)
    allowed = ", ".join(str(k) for k in allowed_tensor_parallel_sizes(shape))
    return f"tensorParallelSize {size} is impossible for this model: {'; '.join(problems)} (it allows {allowed})"


@dataclass(frozen=True, slots=True)
class ParallelDims:
    """A replica's parallel layout (torchtitan's ParallelDims, TP only): validated on construction.

    `world_size` processes (ranks) form one process group; all of them are tensor-parallel ranks.
    Raises ValueError naming heads / key-value heads / intermediate size for an impossible layout.
    """

    world_size: int
    tp: int
    shape: ParallelShape

    def __post_init__(self) -> None:
        if self.world_size < 1 or self.tp < 1:
            raise ValueError(f"world_size and tp must be >= 1, got world_size={self.world_size}, tp={self.tp}")
        if self.tp != self.world_size:
            raise ValueError(f"tp ({self.tp}) must equal world_size ({self.world_size}): "
                             "tensor parallelism is the only dimension a replica has")
        if tensor_parallel_problems(self.shape, self.tp):
            raise ValueError(describe_problems(self.shape, self.tp))

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

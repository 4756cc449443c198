"""Which TP plan splits a checkpoint, and the validated layout of a replica. Data in, data out.

The plan is transformers' kind of data (module-name glob → style name): the checkpoint's own
`base_model_tp_plan` when its config class has one, else `PROJECT_TP_PLANS[model_type]`. Either
way transformers applies it while loading (`DistributedConfig(tp_plan=...)`) and nnsight 0.8.1
reads it back off the model to show users whole tensors.

    python -m model_runtime.replica.parallel.plans --model-types   # regenerate api/tp_model_types.py
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from ndif_operator.api.parallel import PROJECT_TP_PLANS, ParallelDims, ParallelShape


@dataclass(frozen=True)
class ResolvedPlan:
    plan: dict[str, str]  # module-name pattern (relative to the base model) → style
    source: str  # "checkpoint" (its config's base_model_tp_plan) | "project" (our table)


def _text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


def parallel_shape(config: Any) -> ParallelShape:
    """The numbers the one TP rule needs, read off a transformers config object."""
    text = _text_config(config)
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    kv = int(getattr(text, "num_key_value_heads", 0) or heads)
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    intermediate = int(getattr(text, "intermediate_size", 0) or getattr(text, "ffn_dim", 0) or 4 * hidden)
    return ParallelShape.of(str(getattr(text, "model_type", "")), heads, kv, intermediate)


def resolve_plan(config: Any) -> ResolvedPlan:
    """The plan that splits this checkpoint; ValueError when there is none."""
    own = getattr(_text_config(config), "base_model_tp_plan", None)
    if own:
        return ResolvedPlan(plan=dict(own), source="checkpoint")
    model_type = str(getattr(_text_config(config), "model_type", ""))
    table = PROJECT_TP_PLANS.get(model_type)
    if table is None:
        raise ValueError(f"model type {model_type!r} has no tensor-parallel plan: its config has no "
                         "base_model_tp_plan and the project's table has none either")
    return ResolvedPlan(plan={k: str(v) for k, v in table.items()}, source="project")


def replica_dims(config: Any, tensor_parallel_size: int) -> ParallelDims:
    """The replica's validated layout (raises naming heads / kv heads / intermediate size)."""
    return ParallelDims(world_size=tensor_parallel_size, tp=tensor_parallel_size, shape=parallel_shape(config))


def transformers_model_types() -> list[str]:
    """Model types whose transformers config ships a plan made only of styles nnsight can gather."""
    from nnsight.modeling.tp.fragments import SIDES
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    found = []
    for model_type in CONFIG_MAPPING:
        try:
            plan = getattr(CONFIG_MAPPING[model_type], "base_model_tp_plan", None)
        except Exception:  # a config class whose optional dependency is missing
            continue
        if plan and all(style in SIDES for style in plan.values()):
            found.append(model_type)
    return sorted(found)


def main(argv: list[str]) -> int:
    if argv != ["--model-types"]:
        print(__doc__)
        return 2
    print("\n".join(transformers_model_types()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""TP plans as data: which plan splits a checkpoint, and the list the planner reads without transformers."""

from __future__ import annotations

import pytest

from model_runtime.replica.parallel.plans import replica_dims, resolve_plan, transformers_model_types
from model_runtime.tiny_models import build_config
from ndif_operator.api.tp_model_types import TRANSFORMERS_TP_MODEL_TYPES


def test_the_planners_model_type_list_matches_the_installed_transformers_and_nnsight() -> None:
    assert sorted(TRANSFORMERS_TP_MODEL_TYPES) == transformers_model_types(), (
        "regenerate ndif_operator/api/tp_model_types.py from "
        "`python -m model_runtime.replica.parallel.plans --model-types`"
    )


def test_the_checkpoints_own_plan_wins_and_the_project_table_fills_gaps() -> None:
    llama = resolve_plan(build_config("llama", 300))
    assert llama.source == "checkpoint" and llama.plan["layers.*.self_attn.o_proj"] == "rowwise"
    # A config without a plan of its own falls back to the project's table for its model type.
    bare = build_config("llama", 300)
    bare.base_model_tp_plan = None
    fallback = resolve_plan(bare)
    assert fallback.source == "project" and fallback.plan == llama.plan
    with pytest.raises(ValueError, match="'gpt2' has no tensor-parallel plan"):
        resolve_plan(build_config("gpt2", 300))


def test_replica_dims_refuse_an_impossible_layout_before_loading() -> None:
    assert replica_dims(build_config("llama", 300), 2).tp == 2
    with pytest.raises(ValueError, match="key/value heads 2 is not divisible by 4"):
        replica_dims(build_config("llama", 300), 4)


def test_the_project_table_agrees_with_transformers_where_both_have_a_plan() -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from ndif_operator.api.parallel import PROJECT_TP_PLANS

    for model_type, plan in PROJECT_TP_PLANS.items():
        theirs = CONFIG_MAPPING[model_type].base_model_tp_plan
        assert {k: str(v) for k, v in plan.items()} == dict(theirs), model_type

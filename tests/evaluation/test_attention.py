"""One attention rule (`ndif_operator.api.attention`) for the estimator and the runtime's loaders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from model_runtime.replica.loading import attention_for
from ndif_operator.api import ModelSpec, RuntimeLimits
from ndif_operator.api.attention import Attention, attention_implementation
from ndif_operator.api.sdpa_model_types import SDPA_MODEL_TYPES
from ndif_operator.evaluation import estimate


def _installed_sdpa_model_types() -> list[str]:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = []
    for model_type, names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        name = names if isinstance(names, str) else names[0]
        if getattr(transformers, name)._supports_sdpa:
            found.append(model_type)
    return sorted(found)


def test_the_sdpa_table_matches_the_installed_transformers() -> None:
    installed = _installed_sdpa_model_types()
    assert sorted(SDPA_MODEL_TYPES) == installed, (
        "regenerate ndif_operator/api/sdpa_model_types.py; the installed transformers supports SDPA for:\n"
        + "\n".join(f'    "{t}",' for t in installed)
    )


def test_sdpa_unless_the_checkpoint_forces_eager() -> None:
    assert attention_implementation({"model_type": "llama"}) == Attention.SDPA
    assert attention_implementation({"model_type": "gemma2"}) == Attention.EAGER  # no SDPA path in its class
    assert attention_implementation({"model_type": "my_remote_code_model"}) == Attention.EAGER
    assert attention_implementation({"model_type": "llama", "attn_implementation": "eager"}) == Attention.EAGER
    assert attention_implementation({"model_type": "llama", "output_attentions": True}) == Attention.EAGER
    assert attention_implementation({"model_type": "llava", "text_config": {"model_type": "llama"}}) == Attention.EAGER
    assert attention_implementation({"text_config": {"model_type": "llama"}}) == Attention.SDPA


def test_the_runtime_loads_what_the_estimator_sized(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    eager = tmp_path / "llama-eager"
    shutil.copytree(tiny_models["llama"], eager)
    config = json.loads((eager / "config.json").read_text())
    (eager / "config.json").write_text(json.dumps({**config, "attn_implementation": "eager"}))
    for path, expected in ((tiny_models["llama"], "sdpa"), (tiny_models["gpt2"], "sdpa"), (eager, "eager")):
        spec = ModelSpec.model_validate({"repoId": "t/m", "source": {"localPath": {"path": str(path)}}})
        assert estimate(spec, RuntimeLimits()).attention == expected
        assert attention_for(str(path)) == expected
        # What the replica's loaders pass to transformers is what transformers runs.
        module = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention_for(str(path)))
        assert module.config._attn_implementation == expected

"""The evaluator on tiny real checkpoints: exact weight bytes, dtype conversion, ties, shards, cache."""

from __future__ import annotations

import json
import shutil
import struct
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ndif_operator.api import DType, EstimateMethod, LocalPathSource, ModelSource, ModelSpec, RuntimeLimits
from ndif_operator.evaluation import (
    EstimateCache,
    EstimateError,
    EstimatePending,
    cache_key,
    estimate,
    evaluate,
    runtime_budget,
    shape_from_config,
)
from ndif_operator.evaluation import estimator as estimator_module
from ndif_operator.evaluation.sources import hf_cache_snapshot

NOW = datetime(2026, 1, 1, tzinfo=UTC)
LIMITS = RuntimeLimits(max_batch_size=2, max_sequence_length=64)


def spec(path: Path, dtype: DType = DType.FLOAT32, repo: str = "tiny/model") -> ModelSpec:
    return ModelSpec(repo_id=repo, dtype=dtype, source=ModelSource(local_path=LocalPathSource(path=str(path))))


def loaded_bytes(path: Path, dtype: torch.dtype) -> int:
    """What a real load holds: parameters (tied ones once) plus buffers."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama-tied", "llama-sharded"])
@pytest.mark.parametrize("dtype", [DType.FLOAT32, DType.BFLOAT16])
def test_weights_equal_exact_parameter_and_buffer_bytes(
    tiny_models: dict[str, Path], arch: str, dtype: DType
) -> None:
    est = estimate(spec(tiny_models[arch], dtype), LIMITS, now=NOW)
    assert est.weights_bytes == loaded_bytes(tiny_models[arch], getattr(torch, dtype.value))
    assert est.method == EstimateMethod.SAFETENSORS_HEADERS
    assert est.total_bytes > est.weights_bytes


def test_bfloat16_request_of_a_float32_checkpoint_halves_the_parameters(tiny_models: dict[str, Path]) -> None:
    fp32 = estimate(spec(tiny_models["gpt2"], DType.FLOAT32), LIMITS).weights_bytes
    bf16 = estimate(spec(tiny_models["gpt2"], DType.BFLOAT16), LIMITS).weights_bytes
    assert bf16 * 2 == fp32  # GPT-2 has no non-persistent buffers
    auto = estimate(spec(tiny_models["gpt2"], DType.AUTO), LIMITS).weights_bytes
    assert auto == fp32


def test_sharded_equals_single_file(tiny_models: dict[str, Path]) -> None:
    assert len(list(tiny_models["llama-sharded"].glob("*.safetensors"))) > 1
    sharded = estimate(spec(tiny_models["llama-sharded"]), LIMITS)
    single = estimate(spec(tiny_models["llama"]), LIMITS)
    assert sharded.weights_bytes == single.weights_bytes


def test_tied_embeddings_stored_twice_are_counted_once(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    src = tiny_models["llama-tied"]
    shutil.copytree(src, tmp_path / "m")
    tensors = load_file(src / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # a non-HF writer's copy
    save_file(tensors, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    assert estimate(spec(tmp_path / "m"), LIMITS).weights_bytes == loaded_bytes(src, torch.float32)


def test_checkpoint_without_safetensors_waits_for_the_meta_evaluator(tiny_models: dict[str, Path]) -> None:
    model = spec(tiny_models["gpt2-bin"])
    with pytest.raises(EstimatePending) as info:
        estimate(model, LIMITS)
    assert info.value.cache_key == cache_key(model)


def test_cache_hit_costs_no_io(tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cache = EstimateCache()
    model = spec(tiny_models["llama"])
    first = estimate(model, LIMITS, cache, now=NOW)
    assert len(cache) == 1 and cache.dirty

    def no_io(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cache hit must not open the checkpoint")

    monkeypatch.setattr(estimator_module, "open_checkpoint", no_io)
    again = estimate(model, LIMITS, cache)
    assert again == first and again.evaluated_at == NOW
    bigger = estimate(model, RuntimeLimits(max_batch_size=8, max_sequence_length=64), cache)
    assert bigger.weights_bytes == first.weights_bytes and bigger.total_bytes > first.total_bytes
    # A different dtype is a different key: it needs I/O.
    with pytest.raises(AssertionError, match="must not open"):
        estimate(spec(tiny_models["llama"], DType.BFLOAT16), LIMITS, cache)


def test_cache_round_trips_through_configmap_data(tiny_models: dict[str, Path]) -> None:
    cache = EstimateCache()
    for arch in ("llama", "gpt2"):
        estimate(spec(tiny_models[arch], repo=f"tiny/{arch}"), LIMITS, cache, now=NOW)
    data = cache.to_configmap_data()
    assert all(len(k) <= 253 and all(c.isalnum() or c in "-._" for c in k) for k in data)
    data["garbage"] = "{not json"
    loaded = EstimateCache.from_configmap_data(data)
    assert [e.key for e in loaded] == [e.key for e in cache]
    assert loaded.to_configmap_data() == cache.to_configmap_data()
    assert not loaded.dirty
    entry = next(iter(loaded))
    assert entry.method == "SafetensorsHeaders" and entry.evaluated_at == NOW


def test_hf_cache_layout_is_resolved(tiny_models: dict[str, Path], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny--llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_models["llama"], repo / "snapshots" / commit)
    assert hf_cache_snapshot("tiny/llama", "main", tmp_path / "hub") == repo / "snapshots" / commit
    assert hf_cache_snapshot("tiny/llama", commit, tmp_path / "hub") == repo / "snapshots" / commit
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    model = ModelSpec(repo_id="tiny/llama", dtype=DType.FLOAT32)
    assert estimate(model, LIMITS).weights_bytes == loaded_bytes(tiny_models["llama"], torch.float32)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EstimateError, match="not in the Hugging Face cache"):
        estimate(ModelSpec(repo_id="tiny/absent"), LIMITS)


def test_bad_checkpoints_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(EstimateError, match="not a directory"):
        estimate(spec(tmp_path / "nope"), LIMITS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EstimateError, match="no checkpoint files"):
        estimate(spec(tmp_path / "empty"), LIMITS)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(EstimateError, match="ends inside its header"):
        estimate(spec(bad), LIMITS)
    header = json.dumps({"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 2]}}).encode()
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(EstimateError, match="unknown dtype"):
        estimate(spec(bad), LIMITS)


def test_budget_is_derived_from_the_config() -> None:
    llama = shape_from_config(
        {"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
         "intermediate_size": 14336, "vocab_size": 128256}
    )
    gpt2 = shape_from_config({"n_layer": 12, "n_embd": 768, "n_head": 12, "n_inner": None, "vocab_size": 50257})
    assert (gpt2.num_layers, gpt2.hidden_size, gpt2.intermediate_size, gpt2.head_dim) == (12, 768, 3072, 64)
    b = runtime_budget(llama, RuntimeLimits(max_batch_size=1, max_sequence_length=4096), 2)
    assert b.kv_cache == 2 * 32 * 8 * 128 * 4096 * 2  # 512 MiB: the well-known 128 KiB/token of Llama-3-8B
    assert b.head >= 4096 * 128256 * 2  # logits in the model's dtype
    small = runtime_budget(llama, RuntimeLimits(max_batch_size=1, max_sequence_length=1024), 2)
    assert small.total < b.total
    with pytest.raises(ValueError, match="lacks"):
        shape_from_config({"hidden_size": 8})


def test_evaluate_records_method_time_and_shape(tiny_models: dict[str, Path]) -> None:
    entry = evaluate(spec(tiny_models["gpt2"]), now=NOW)
    assert entry.method == "SafetensorsHeaders" and entry.evaluated_at == NOW
    assert entry.shape is not None and entry.shape.num_layers == 2 and entry.element_size == 4

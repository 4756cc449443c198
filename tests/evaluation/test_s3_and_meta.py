"""S3 sources against a real local moto server (only headers travel), and the runtime-side
meta-device fallback whose output becomes a cache entry."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest

from model_runtime import meta_evaluator
from ndif_operator.api import DType, LocalPathSource, ModelSource, ModelSpec, RuntimeLimits, S3Source
from ndif_operator.evaluation import (
    EstimateCache,
    EstimatePending,
    cache_key,
    entry_from_runtime_output,
    estimate,
)
from ndif_operator.evaluation import cache as cache_module
from ndif_operator.evaluation import estimator as estimator_module

LIMITS = RuntimeLimits(max_batch_size=2, max_sequence_length=64)
NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def s3(tiny_models: dict[str, Path], s3_endpoint: str) -> Iterator[tuple[Any, list[int]]]:
    client = boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1",
        aws_access_key_id="test", aws_secret_access_key="test",
    )
    client.create_bucket(Bucket="ckpt")
    for name in ("llama-sharded", "llama", "gpt2-bin"):
        for f in sorted(tiny_models[name].iterdir()):
            client.upload_file(str(f), "ckpt", f"models/{name}/{f.name}")
    received: list[int] = []
    client.meta.events.register(
        "after-call.s3.GetObject", lambda parsed, **_: received.append(int(parsed.get("ContentLength", 0)))
    )
    yield client, received


def s3_spec(name: str, dtype: DType = DType.FLOAT32) -> ModelSpec:
    return ModelSpec(
        repo_id=f"tiny/{name}", dtype=dtype,
        source=ModelSource(s3=S3Source(bucket="ckpt", prefix=f"models/{name}/", endpoint_url="http://x")),
    )


def local_spec(path: Path, dtype: DType = DType.FLOAT32) -> ModelSpec:
    return ModelSpec(repo_id="tiny/x", dtype=dtype, source=ModelSource(local_path=LocalPathSource(path=str(path))))


def test_s3_estimate_reads_only_headers(s3: tuple[Any, list[int]], tiny_models: dict[str, Path]) -> None:
    client, received = s3
    received.clear()
    remote = estimate(s3_spec("llama-sharded"), LIMITS, s3_client=client)
    local = estimate(local_spec(tiny_models["llama-sharded"]), LIMITS)
    assert remote.weights_bytes == local.weights_bytes
    small_files = sum(
        (tiny_models["llama-sharded"] / n).stat().st_size for n in ("config.json", "model.safetensors.index.json")
    )
    shards = len(list(tiny_models["llama-sharded"].glob("*.safetensors")))
    # One ranged GET of at most 64 KiB per shard (real shards are GBs), plus the two small JSON files.
    assert sum(received) <= small_files + shards * 64 * 1024
    assert len(received) == shards + 2


def test_s3_two_step_header_read_fetches_exactly_the_headers(
    s3: tuple[Any, list[int]], tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, received = s3
    monkeypatch.setattr(estimator_module, "FIRST_READ_BYTES", 8)
    received.clear()
    estimate(s3_spec("llama-sharded"), LIMITS, s3_client=client)
    shards = sorted(tiny_models["llama-sharded"].glob("*.safetensors"))
    headers = sum(8 + struct.unpack("<Q", f.read_bytes()[:8])[0] for f in shards)
    small_files = sum(
        (tiny_models["llama-sharded"] / n).stat().st_size for n in ("config.json", "model.safetensors.index.json")
    )
    checkpoint = sum(f.stat().st_size for f in shards)
    assert sum(received) == small_files + headers
    assert headers < checkpoint / 20


def test_s3_key_differs_from_local_and_errors_are_clear(s3: tuple[Any, list[int]]) -> None:
    client, _ = s3
    assert cache_key(s3_spec("llama")).startswith("s3:http://x|ckpt/models/llama@main#")
    with pytest.raises(EstimatePending):
        estimate(s3_spec("gpt2-bin"), LIMITS, s3_client=client)
    with pytest.raises(Exception, match="no checkpoint files"):
        estimate(s3_spec("absent"), LIMITS, s3_client=client)


@pytest.mark.parametrize("dtype", [DType.FLOAT32, DType.BFLOAT16])
def test_meta_evaluator_entry_lands_in_the_cache(tiny_models: dict[str, Path], dtype: DType,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tiny_models["gpt2-bin"]
    model = local_spec(path, dtype)
    with pytest.raises(EstimatePending) as info:
        estimate(model, LIMITS)
    assert meta_evaluator.main([str(path), "--key", info.value.cache_key, "--dtype", dtype.value]) == 0
    entry = entry_from_runtime_output(capsys.readouterr().out)
    cache = EstimateCache()
    cache.put(entry)
    est = estimate(model, LIMITS, cache)  # no longer pending: the runtime's entry is a hit
    assert est.method == "MetaDevice"
    # The same checkpoint in safetensors form gives the same bytes by the header route.
    assert est.weights_bytes == estimate(local_spec(tiny_models["llama"].parent / "gpt2", dtype), LIMITS).weights_bytes


def test_meta_evaluator_matches_headers_on_rope_models(tiny_models: dict[str, Path]) -> None:
    for arch in ("llama", "llama-tied"):
        line = meta_evaluator.cache_entry_json("k", str(tiny_models[arch]), DType.BFLOAT16, now=NOW)
        entry = entry_from_runtime_output(line)
        headers = estimate(local_spec(tiny_models[arch], DType.BFLOAT16), LIMITS)
        assert entry.weights_bytes == headers.weights_bytes
        assert entry.shape is not None and entry.shape.num_key_value_heads == 2


def test_meta_evaluator_failure_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert meta_evaluator.main([str(tmp_path), "--key", "k"]) == 1
    with pytest.raises(ValueError, match="meta-device evaluator failed"):
        entry_from_runtime_output(capsys.readouterr().out)


def test_runtime_and_operator_agree_on_the_entry_version() -> None:
    assert meta_evaluator._ENTRY_VERSION == cache_module._SCHEMA_VERSION


def test_meta_evaluator_job_command_sizes_an_s3_bin_checkpoint(
        s3: tuple[Any, list[int]], tiny_models: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact arguments the operator's Job gets (`meta_evaluator_args`): config.json comes from S3,
    and the entry lands in the termination log as well as on stdout."""
    from ndif_operator.evaluation.meta_command import meta_evaluator_args

    client, _ = s3
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    model = ModelSpec(repo_id="org/gpt2-bin", dtype=DType.FLOAT32, source=ModelSource(s3=S3Source(
        bucket="ckpt", prefix="models/gpt2-bin/", endpoint_url=client.meta.endpoint_url, region="us-east-1")))
    with pytest.raises(EstimatePending) as pending:
        estimate(model, LIMITS, EstimateCache(), now=NOW, s3_client=client)
    log = tmp_path / "termination-log"
    args = meta_evaluator_args(model, pending.value.cache_key, termination_log=str(log))
    assert args[-1] == "s3://ckpt/models/gpt2-bin"
    assert meta_evaluator.main(args) == 0
    entry = entry_from_runtime_output(log.read_text())
    local = entry_from_runtime_output(meta_evaluator.cache_entry_json(
        "k", str(tiny_models["gpt2-bin"]), DType.FLOAT32, now=NOW))
    assert entry.key == pending.value.cache_key and entry.method == "MetaDevice"
    assert entry.weights_bytes == local.weights_bytes and entry.shape == local.shape

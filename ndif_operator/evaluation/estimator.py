"""`estimate`: the evaluator's entry point (see the package docstring).

Flow: cache hit → recompute the total for these limits (no I/O). Miss → open the checkpoint
(local path, HF cache, S3, Hub), read config.json and the safetensors headers only, count the
weights exactly (`weights`), and record a cache entry. A checkpoint without safetensors raises
`EstimatePending`: only instantiating it on the meta device can size it, which needs torch, so
the runtime-side evaluator (`model_runtime.meta_evaluator`) produces that entry.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

from ndif_operator.api import (
    TENSOR_PARALLEL_SIZES,
    DType,
    Estimate,
    EstimateMethod,
    ModelSpec,
    RankEstimate,
    RuntimeLimits,
)
from ndif_operator.api.parallel import ParallelShape
from ndif_operator.api.units import human_bytes
from ndif_operator.evaluation.budget import CUDA_CONTEXT_BYTES, rank_bytes
from ndif_operator.evaluation.cache import CacheEntry, EstimateCache, cache_key
from ndif_operator.evaluation.errors import EstimateError, EstimatePending
from ndif_operator.evaluation.safetensors_header import (
    FIRST_READ_BYTES,
    HeaderError,
    TensorInfo,
    header_length,
    parse_header,
)
from ndif_operator.evaluation.shape import shape_from_config
from ndif_operator.evaluation.sources import CheckpointFiles, SourceCredentials, open_checkpoint
from ndif_operator.evaluation.weights import weights_from_tensors

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Without a usable config the budget falls back to a share of the weights (docs/placement.md).
FALLBACK_BUDGET_RATIO = 0.2


def _read_json(files: CheckpointFiles, name: str) -> dict[str, Any]:
    try:
        body = json.loads(files.read(name))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EstimateError(f"{files.description}: {name} is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise EstimateError(f"{files.description}: {name} is not a JSON object")
    return body


def read_header(files: CheckpointFiles, name: str) -> list[TensorInfo]:
    """The tensors of one safetensors file: one ranged read, two for very large headers."""
    first = files.read(name, 0, FIRST_READ_BYTES)
    try:
        length = header_length(first)
        raw = first[8 : 8 + length]
        if len(raw) < length:
            raw += files.read(name, len(first), 8 + length - len(first))
        if len(raw) < length:
            raise HeaderError("file ends inside its header")
        return parse_header(raw)
    except HeaderError as exc:
        raise EstimateError(f"{files.description}: {name}: {exc}") from exc


def safetensors_files(files: CheckpointFiles, names: list[str]) -> list[str]:
    """The safetensors files that make up the model (index first, then a single file)."""
    present = set(names)
    if INDEX_FILE in present:
        weight_map = _read_json(files, INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise EstimateError(f"{files.description}: {INDEX_FILE} has no weight_map")
        shards = sorted({str(v) for v in weight_map.values()})
        missing = [s for s in shards if s not in present]
        if missing:
            raise EstimateError(f"{files.description}: shards listed in {INDEX_FILE} are missing: {missing}")
        return shards
    if SINGLE_FILE in present:
        return [SINGLE_FILE]
    # Some repos also ship a `consolidated.safetensors` (another framework's copy): not ours to count.
    return [n for n in names if n.endswith(".safetensors") and not n.startswith("consolidated")]


def evaluate(
    model: ModelSpec,
    *,
    now: datetime,
    s3_client: Any | None = None,
    hf_token: str | None = None,
    credentials: SourceCredentials | None = None,
) -> CacheEntry:
    """Size `model` from its files (I/O); the result is a cache entry."""
    key = cache_key(model)
    files = open_checkpoint(model, s3_client=s3_client, hf_token=hf_token, credentials=credentials)
    names = files.names()
    config = _read_json(files, "config.json") if "config.json" in names else None
    shards = safetensors_files(files, names)
    if not shards:
        if any(n.endswith(_PICKLE_SUFFIXES) for n in names):
            raise EstimatePending(
                f"{files.description} has no safetensors files; waiting for the runtime-side"
                " meta-device evaluator",
                key,
            )
        raise EstimateError(f"{files.description} holds no checkpoint files (found: {names[:10]})")
    tensors = [t for shard in shards for t in read_header(files, shard)]
    weights = weights_from_tensors(tensors, DType(model.dtype), config)
    try:
        shape = shape_from_config(config) if config is not None else None
    except ValueError:
        shape = None
    return CacheEntry(
        key=key,
        weights_bytes=weights.bytes,
        parameter_count=weights.parameters,
        method=EstimateMethod.SAFETENSORS_HEADERS.value,
        evaluated_at=now,
        shape=shape,
        element_size=weights.element_size,
    )


def estimate_from_entry(entry: CacheEntry, limits: RuntimeLimits) -> Estimate:
    """Weights from the entry plus the runtime budget for `limits`, per rank at every tensor-parallel
    size: pure, no I/O."""
    shape = entry.shape
    if shape is None:
        total = entry.weights_bytes + math.ceil(entry.weights_bytes * FALLBACK_BUDGET_RATIO) + CUDA_CONTEXT_BYTES
        return Estimate(weights_bytes=entry.weights_bytes, total_bytes=total, total=human_bytes(total),
                        method=entry.method, evaluated_at=entry.evaluated_at)
    ranks = [RankEstimate(tensor_parallel_size=k,
                          bytes=rank_bytes(shape, limits, entry.element_size, entry.weights_bytes, k))
             for k in TENSOR_PARALLEL_SIZES]
    total = ranks[0].bytes
    return Estimate(
        parallel=ParallelShape.of(shape.model_type, shape.num_attention_heads, shape.num_key_value_heads,
                                  shape.intermediate_size),
        weights_bytes=entry.weights_bytes,
        total_bytes=total,
        total=human_bytes(total),
        ranks=ranks,
        attention=shape.attention,
        method=entry.method,
        evaluated_at=entry.evaluated_at,
    )


def estimate(
    model: ModelSpec,
    limits: RuntimeLimits,
    cache: EstimateCache | None = None,
    *,
    now: datetime | None = None,
    s3_client: Any | None = None,
    hf_token: str | None = None,
    credentials: SourceCredentials | None = None,
) -> Estimate:
    """Size `model` in its requested dtype for `limits`; a cache hit does no I/O.

    Raises `EstimatePending` when only the runtime-side meta-device fallback can size it, and
    `EstimateError` when it cannot be sized at all.
    """
    entry = cache.get(cache_key(model)) if cache is not None else None
    if entry is None:
        entry = evaluate(model, now=now or datetime.now(UTC), s3_client=s3_client, hf_token=hf_token,
                         credentials=credentials)
        if cache is not None:
            cache.put(entry)
    return estimate_from_entry(entry, limits)

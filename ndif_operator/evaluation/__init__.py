"""The memory evaluator: sizes a checkpoint without loading its weights, and caches the result.

Entry point: `estimate(model, limits, cache) -> ndif_operator.api.Estimate`. It reads
safetensors headers (local directory, HF cache, S3 ranged GETs, or the Hub) and config.json, adds
a runtime budget derived from the config (see `budget`), and records the result in `cache`.
Checkpoints without safetensors raise `EstimatePending`: the runtime-side meta-device evaluator
(`model_runtime.meta_evaluator`) produces the cache entry instead (parse its output with
`entry_from_runtime_output`, then `cache.put`). No torch here.
"""

from ndif_operator.evaluation.budget import Budget, runtime_budget
from ndif_operator.evaluation.cache import (
    CacheEntry,
    EstimateCache,
    cache_key,
    configmap_key,
    entry_from_runtime_output,
    source_id,
)
from ndif_operator.evaluation.errors import EstimateError, EstimatePending
from ndif_operator.evaluation.estimator import estimate, estimate_from_entry, evaluate
from ndif_operator.evaluation.shape import ModelShape, shape_from_config
from ndif_operator.evaluation.sources import SourceCredentials

__all__ = [
    "Budget",
    "CacheEntry",
    "EstimateCache",
    "EstimateError",
    "EstimatePending",
    "ModelShape",
    "SourceCredentials",
    "cache_key",
    "configmap_key",
    "entry_from_runtime_output",
    "estimate",
    "estimate_from_entry",
    "evaluate",
    "runtime_budget",
    "shape_from_config",
    "source_id",
]

"""The memory evaluator: sizes a checkpoint without loading its weights, and caches the result.

Entry point: `estimate(model, limits, cache) -> ndif_operator.api.Estimate`. It reads
safetensors headers (local directory, HF cache, S3 ranged GETs, or the Hub) and config.json, adds
a runtime budget derived from the config (see `budget`), and records the result in `cache`.
Checkpoints without safetensors raise `EstimatePending`: the runtime-side meta-device evaluator
(`model_runtime.meta_evaluator`) produces the cache entry instead. No torch here.
"""

from ndif_operator.evaluation.cache import CacheEntry, EstimateCache, cache_key
from ndif_operator.evaluation.errors import EstimateError, EstimatePending
from ndif_operator.evaluation.estimator import estimate

__all__ = [
    "CacheEntry",
    "EstimateCache",
    "EstimateError",
    "EstimatePending",
    "cache_key",
    "estimate",
]

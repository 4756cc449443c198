"""Why an estimate could not be made."""

from __future__ import annotations


class EstimateError(Exception):
    """The checkpoint cannot be sized (missing files, bad header, unreachable source)."""


class EstimatePending(EstimateError):
    """No safetensors headers: the runtime-side meta-device evaluator must size this checkpoint.

    `cache_key` is where its result must land (see `model_runtime.meta_evaluator`).
    """

    def __init__(self, message: str, cache_key: str) -> None:
        super().__init__(message)
        self.cache_key = cache_key

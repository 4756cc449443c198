"""`estimate`: the evaluator's entry point (see the package docstring)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ndif_operator.api import Estimate, ModelSpec, RuntimeLimits
from ndif_operator.evaluation.cache import EstimateCache


def estimate(
    model: ModelSpec,
    limits: RuntimeLimits,
    cache: EstimateCache | None = None,
    *,
    now: datetime | None = None,
    s3_client: Any | None = None,
) -> Estimate:
    """Size `model` in its requested dtype for `limits`; a cache hit does no I/O.

    Raises `EstimatePending` when only the runtime-side meta-device fallback can size it, and
    `EstimateError` when it cannot be sized at all.
    """
    raise NotImplementedError("evaluator under construction")

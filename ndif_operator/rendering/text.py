"""The byte-stable text of a Serve config.

KubeRay re-submits `serveConfigV2` whenever the string differs from its cache, so
the same config must always produce the same bytes: sorted keys, one number format, no timestamps.
JSON is valid YAML, so the string goes into `serveConfigV2` as is and stays diffable.
"""

from __future__ import annotations

import json
import math
from typing import Any

# Ray accepts 4 decimals for fractional resources; more digits only make strings unstable.
_DECIMALS = 4


def canonical_number(value: float) -> int | float:
    """An integral value as int (1.0 → 1), anything else rounded to 4 decimals."""
    if isinstance(value, bool):
        raise TypeError("booleans are not numbers here")
    if isinstance(value, int):
        return value
    if not math.isfinite(value):
        raise ValueError(f"non-finite number {value!r} in a serve config")
    rounded = round(value, _DECIMALS)
    return int(rounded) if rounded == int(rounded) else rounded


def canonicalize(value: Any) -> Any:
    """A copy of a JSON-like value with every float in canonical form."""
    if isinstance(value, dict):
        return {str(k): canonicalize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [canonicalize(v) for v in value]
    if isinstance(value, float):
        return canonical_number(value)
    return value


def serve_config_text(config: dict[str, Any]) -> str:
    """The exact `serveConfigV2` string for `config` (stable across runs and processes)."""
    return json.dumps(canonicalize(config), indent=2, sort_keys=True, ensure_ascii=True) + "\n"

"""The small subset of kubectl JSONPath that CRD printer columns use.

Supports `.a.b.c`, `[N]` and a single equality filter `[?(@.key=="value")]`, which is all the
ModelDeployment and RayService columns need. Returns the list of matches (kubectl prints the first).
"""

from __future__ import annotations

import re
from typing import Any

_TOKEN = re.compile(r"\.([A-Za-z0-9_-]+)|\[(\d+)\]|\[\?\(@\.([A-Za-z0-9_.-]+)\s*==\s*[\"']([^\"']*)[\"']\)\]")


def evaluate(path: str, obj: Any) -> list[Any]:
    """All values `path` selects in `obj` (empty when a step is missing)."""
    path = path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    values: list[Any] = [obj]
    position = 0
    while position < len(path):
        match = _TOKEN.match(path, position)
        if match is None:
            raise ValueError(f"unsupported JSONPath {path!r} at {position}")
        position = match.end()
        field, index, filter_key, filter_value = match.groups()
        selected: list[Any] = []
        for value in values:
            if field is not None:
                if isinstance(value, list):  # `.x` after a filter applies to every match
                    selected.extend(v[field] for v in value if isinstance(v, dict) and field in v)
                elif isinstance(value, dict) and field in value:
                    selected.append(value[field])
            elif index is not None:
                if isinstance(value, list) and int(index) < len(value):
                    selected.append(value[int(index)])
            elif isinstance(value, list):
                selected.extend(
                    item for item in value
                    if isinstance(item, dict) and str(_dig(item, filter_key)) == filter_value
                )
        values = selected
    return values


def _dig(obj: dict[str, Any], dotted: str) -> Any:
    current: Any = obj
    for part in dotted.split("."):
        if not isinstance(current, dict) or part not in current:
            return None
        current = current[part]
    return current

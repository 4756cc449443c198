"""Validate a rendered Serve config against Ray Serve's own schema, without importing ray.

`serve_schema.json` is exported from the installed Ray by `tools/export_serve_schema.py` (a test
checks it for drift). Serve silently ignores unknown keys (ray#61439), which would hide renderer
typos, so the validator is stricter than Serve: objects that declare `properties` reject keys they
do not declare. The cross-field rules Serve checks in code (unique app names and route prefixes,
one of num_replicas/autoscaling) are checked here too.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA_PATH = Path(__file__).with_name("serve_schema.json")

# Objects whose extra keys are free-form by design.
_OPEN_OBJECTS = frozenset({"args", "user_config", "runtime_env", "resources", "env_vars"})


class ServeConfigInvalid(ValueError):
    """The rendered config would be rejected or misread by Ray Serve."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("invalid serve config: " + "; ".join(errors))


def _close(node: Any, key: str | None = None) -> Any:
    if isinstance(node, dict):
        closed = {k: _close(v, k) for k, v in node.items()}
        if "properties" in closed and "additionalProperties" not in closed and key not in _OPEN_OBJECTS:
            closed["additionalProperties"] = False
        return closed
    if isinstance(node, list):
        return [_close(v) for v in node]
    return node


@cache
def _validator() -> jsonschema.Draft202012Validator:
    schema = _close(copy.deepcopy(json.loads(SCHEMA_PATH.read_text())))
    return jsonschema.Draft202012Validator(schema)


def validate_serve_config(config: dict[str, Any]) -> list[str]:
    """Every reason Ray Serve would reject (or silently misread) `config`; empty when valid."""
    errors = [
        f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in sorted(_validator().iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    ]
    apps = config.get("applications") or []
    names = [app.get("name") for app in apps]
    for name in sorted({n for n in names if names.count(n) > 1}):
        errors.append(f"applications: duplicate application name {name!r}")
    prefixes = [app.get("route_prefix", "/") for app in apps if app.get("route_prefix", "/") is not None]
    for prefix in sorted({p for p in prefixes if prefixes.count(p) > 1}):
        errors.append(f"applications: duplicate route_prefix {prefix!r}")
    for app in apps:
        for deployment in app.get("deployments") or []:
            if "num_replicas" in deployment and "autoscaling_config" in deployment:
                errors.append(f"{app.get('name')}.{deployment.get('name')}: set num_replicas or "
                              "autoscaling_config, not both")
    return errors


def check_serve_config(config: dict[str, Any]) -> None:
    errors = validate_serve_config(config)
    if errors:
        raise ServeConfigInvalid(errors)

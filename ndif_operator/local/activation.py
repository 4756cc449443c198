"""Local mode's activation on request: poll the local gateway, decide, re-plan when it changes.

The decision is the operator's (`planning.activation.activation_until`); local mode keeps the
windows in memory (a restart of local mode starts from the manifests' levels) and reads the
gateway on loopback with plain urllib, as it talks to Serve's REST API.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from datetime import datetime

from ndif_operator.api import Level, ModelDeployment
from ndif_operator.api.naming import API_KEY_HEADER
from ndif_operator.local.manifests import deployment_key
from ndif_operator.planning.activation import Demand, activation_until, demands_from_gateway_status, is_active

DEFAULT_TTL_S = 900.0


def candidates(deployments: Sequence[ModelDeployment]) -> list[ModelDeployment]:
    return [md for md in deployments if md.spec.activate_on_request and Level(md.spec.level) == Level.WARM]


def read_gateway_demands(url: str, api_key: str | None = None, *, timeout: float = 3.0) -> dict[str, Demand]:
    """`namespace/name` → demand from `<url>/status`; empty when the gateway cannot be read."""
    request = urllib.request.Request(url.rstrip("/") + "/status")
    if api_key:
        request.add_header(API_KEY_HEADER, api_key)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return {}
    return demands_from_gateway_status(body) if isinstance(body, dict) else {}


def next_windows(deployments: Sequence[ModelDeployment], demands: Mapping[str, Demand],
                 current: Mapping[str, datetime], *, now: datetime,
                 ttl_s: float = DEFAULT_TTL_S) -> dict[str, datetime]:
    """Each activateOnRequest Warm deployment's window end (past ends kept: the demand was served)."""
    windows: dict[str, datetime] = {}
    for md in candidates(deployments):
        key = deployment_key(md)
        until = activation_until(activate_on_request=True, spec_level=Level(md.spec.level), demand=demands.get(key),
                                 current_until=current.get(key), now=now,
                                 minimum_deployment_seconds=md.spec.minimum_deployment_seconds, ttl_seconds=ttl_s)
        if until is not None:
            windows[key] = until
    return windows


def active_keys(windows: Mapping[str, datetime], now: datetime) -> frozenset[str]:
    return frozenset(k for k, until in windows.items() if is_active(until, now))

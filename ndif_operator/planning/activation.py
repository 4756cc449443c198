"""Activation on request: how long a Warm model with `activateOnRequest` is asked to be Hot. Pure.

The gateway answers 503 for a WARM model and records the demand; its `GET /status` lists
`activation_requested` per deployment and `activation_requested_at` (epoch seconds of the last
refused request; older gateways leave it out). The operator and local mode read it and call
`activation_until`: a new demand makes the model Hot for `max(minimumDeploymentSeconds, ttl)`;
when that passes it returns to Warm.

A demand is new when its time is after the end of the last activation. A gateway that reports
only the boolean (which it never clears) gives no time: then only the first demand activates, so
that a stale flag cannot keep a model Hot forever (docs/operator.md "Activation on request").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ndif_operator.api import Level


@dataclass(frozen=True, slots=True)
class Demand:
    requested: bool
    at: datetime | None = None  # when the gateway last saw a refused request, if it says


def demands_from_gateway_status(body: Mapping[str, Any]) -> dict[str, Demand]:
    """`namespace/name` → demand, from the gateway's `GET /status` JSON (bad entries skipped)."""
    result: dict[str, Demand] = {}
    deployments = body.get("deployments") if isinstance(body, Mapping) else None
    if not isinstance(deployments, Mapping):
        return result
    for info in deployments.values():
        if not isinstance(info, Mapping) or not isinstance(info.get("deployment"), str):
            continue
        at_value = info.get("activation_requested_at")
        at = datetime.fromtimestamp(float(at_value), UTC) if isinstance(at_value, int | float) else None
        result[info["deployment"]] = Demand(requested=bool(info.get("activation_requested")), at=at)
    return result


def activation_window(minimum_deployment_seconds: int, ttl_seconds: float) -> timedelta:
    return timedelta(seconds=max(float(minimum_deployment_seconds), ttl_seconds))


def activation_until(*, activate_on_request: bool, spec_level: Level, demand: Demand | None,
                     current_until: datetime | None, now: datetime, minimum_deployment_seconds: int,
                     ttl_seconds: float) -> datetime | None:
    """The end of the model's Hot-on-request window (kept in status), or None if it never had one.

    A time in the past means the last activation has ended (the model is back at its spec level).
    """
    if not activate_on_request or Level(spec_level) != Level.WARM:
        return None  # only a Warm policy is promoted; a spec change ends any activation
    if current_until is not None and current_until > now:
        return current_until  # active: no extension (a Hot model refuses nothing, so no demand comes)
    if demand is None or not demand.requested:
        return current_until
    if current_until is not None and (demand.at is None or demand.at <= current_until):
        return current_until  # the demand that was already served (or one we cannot date)
    return now + activation_window(minimum_deployment_seconds, ttl_seconds)


def is_active(until: datetime | None, now: datetime) -> bool:
    return until is not None and until > now

"""Read what a RayService says about itself (spec string, app statuses, upgrades, failures). Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ndif_operator.api.naming import model_app_name
from ndif_operator.api.pinning import GPU_LEASE_UNAVAILABLE
from ndif_operator.rendering.pinned import slot_app_names

# KubeRay Ready-condition reasons that mean KubeRay itself gave up or rejected the object.
_FAILURE_REASONS = frozenset({"ValidationFailed", "InitializingTimeout"})


@dataclass(frozen=True, slots=True)
class AppStatus:
    status: str  # NOT_STARTED, DEPLOYING, RUNNING, DEPLOY_FAILED, DELETING, UNHEALTHY
    message: str = ""
    healthy_deployments: int = 0
    deployments: int = 0
    unschedulable: str = ""  # Serve's message about replicas Ray has not scheduled, if any


# Serve's deployment message when replicas wait for resources (ray/serve/_private/deployment_state.py),
# and the replica's own error when the GPU share it leases going HOT stays taken (Serve quotes it).
_UNSCHEDULED_MARKERS = ("to be scheduled", GPU_LEASE_UNAVAILABLE)


def _unscheduled(message: object) -> bool:
    return any(marker in str(message or "") for marker in _UNSCHEDULED_MARKERS)


def serve_config_text(ray_service: Mapping[str, Any]) -> str:
    return str((ray_service.get("spec") or {}).get("serveConfigV2") or "")


def _conditions(ray_service: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {str(c.get("type")): c for c in (ray_service.get("status") or {}).get("conditions") or []}


def upgrade_in_progress(ray_service: Mapping[str, Any]) -> bool:
    """True while KubeRay runs a pending cluster next to the active one (a config would go there only)."""
    condition = _conditions(ray_service).get("UpgradeInProgress")
    if condition is not None:
        return str(condition.get("status")) == "True"
    pending = (ray_service.get("status") or {}).get("pendingServiceStatus") or {}
    return bool(pending.get("rayClusterName"))


def kuberay_failure(ray_service: Mapping[str, Any]) -> str | None:
    """KubeRay's own terminal complaint about the RayService, if any."""
    ready = _conditions(ray_service).get("Ready")
    if ready is not None and str(ready.get("status")) == "False" and ready.get("reason") in _FAILURE_REASONS:
        return f"KubeRay: {ready.get('reason')}: {ready.get('message') or ''}".rstrip(": ")
    return None


def application_statuses(ray_service: Mapping[str, Any]) -> dict[str, AppStatus]:
    """`status.activeServiceStatus.applicationStatuses`, the per-application truth (not top-level Ready)."""
    active = (ray_service.get("status") or {}).get("activeServiceStatus") or {}
    result: dict[str, AppStatus] = {}
    for name, app in (active.get("applicationStatuses") or {}).items():
        deployments = (app or {}).get("serveDeploymentStatuses") or {}
        healthy = sum(1 for d in deployments.values() if (d or {}).get("status") == "HEALTHY")
        waiting = [str((d or {}).get("message")) for d in deployments.values()
                   if _unscheduled((d or {}).get("message"))]
        if not waiting and _unscheduled((app or {}).get("message")):
            waiting = [str((app or {}).get("message"))]
        result[str(name)] = AppStatus(status=str((app or {}).get("status") or "NOT_STARTED"),
                                      message=str((app or {}).get("message") or ""),
                                      healthy_deployments=healthy, deployments=len(deployments),
                                      unschedulable="; ".join(waiting))
    return result


def model_app_status(apps: Mapping[str, AppStatus], namespace: str, name: str) -> AppStatus | None:
    """One ModelDeployment's status over its applications (one per pinned replica slot).

    RUNNING only when every slot runs; otherwise the first slot that does not, with the slots
    whose replicas Ray cannot schedule named in `unschedulable`.
    """
    base = model_app_name(namespace, name)
    slots = [(app, apps[app]) for app in slot_app_names(base, sorted(apps))]
    if not slots:
        return None
    if len(slots) == 1:
        return slots[0][1]
    waiting = "; ".join(f"{slot}: {app.unschedulable}" for slot, app in slots if app.unschedulable)
    lagging = next((app for _, app in slots if app.status != "RUNNING"), None)
    first = lagging or slots[0][1]
    return AppStatus(status=first.status, message=first.message,
                     healthy_deployments=sum(a.healthy_deployments for _, a in slots),
                     deployments=sum(a.deployments for _, a in slots), unschedulable=waiting)


# KubeRay's Events about pushing serveConfigV2 to the Ray dashboard.
SERVE_UPDATE_FAILED = "FailedToUpdateServeApplications"
SERVE_UPDATED = "UpdatedServeApplications"


def _event_time(event: Mapping[str, Any]) -> datetime:
    for key in ("lastTimestamp", "eventTime", "firstTimestamp"):
        value = event.get(key)
        if value:
            try:
                parsed = datetime.fromisoformat(str(value))
            except ValueError:
                continue
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    created = (event.get("metadata") or {}).get("creationTimestamp")
    return datetime.fromisoformat(str(created)) if created else datetime.min.replace(tzinfo=UTC)


def serve_update_failure(events: Sequence[Mapping[str, Any]]) -> str | None:
    """KubeRay's latest word on submitting the serve config, when it is a failure.

    KubeRay does not validate serveConfigV2; when Ray rejects it, the only trace is a Warning Event
    on the RayService. A later `UpdatedServeApplications` means the failure is over.
    """
    relevant = [e for e in events if e.get("reason") in (SERVE_UPDATE_FAILED, SERVE_UPDATED)]
    if not relevant:
        return None
    latest = max(relevant, key=_event_time)
    if latest.get("reason") != SERVE_UPDATE_FAILED:
        return None
    return f"KubeRay: {SERVE_UPDATE_FAILED}: {latest.get('message') or ''}".rstrip(": ")

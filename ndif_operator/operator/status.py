"""A ModelDeployment's status as a pure function of what the reconciler learned. No I/O.

The reconciler gathers an `Observation` per object and calls `compute_status`; it writes the result
only when `status_changed` says so, and posts one Event per condition transition (`transitions`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ndif_operator.api import (
    Condition,
    ConditionStatus,
    ConditionType,
    Estimate,
    Level,
    ModelDeploymentStatus,
    Phase,
    Placement,
    Reason,
)
from ndif_operator.api.units import human_bytes
from ndif_operator.api.v1alpha1 import ModelSchedule
from ndif_operator.operator.ray_service import AppStatus
from ndif_operator.planning import Decision
from ndif_operator.scheduling.model_status import ScheduledState

_PLACED_AS_ASKED = frozenset({Reason.PLACED_HOT, Reason.PLACED_WARM, Reason.PLACED_COLD, Reason.MOVED})
_WARNING_REASONS = frozenset({
    Reason.INVALID_SPEC, Reason.ESTIMATE_FAILED, Reason.INSUFFICIENT_GPU, Reason.INSUFFICIENT_MEMORY,
    Reason.EVICTED, Reason.APPLICATION_FAILED, Reason.APPLICATION_UNHEALTHY, Reason.RAY_SERVICE_MISSING,
    Reason.RAY_SERVICE_ERROR, Reason.SCHEDULE_CONFLICT})
_FAILED_REASONS = frozenset({Reason.INVALID_SPEC, Reason.ESTIMATE_FAILED, Reason.APPLICATION_FAILED})
# Waits an admin may act on (free the GPU another model holds): a Normal Event when they begin.
_NOTED_REASONS = frozenset({Reason.WAITING_FOR_GPU})


@dataclass(frozen=True, slots=True)
class Observation:
    """Everything one reconcile pass knows about one ModelDeployment."""

    generation: int
    desired_level: Level | None = None  # None when the spec did not parse
    invalid: str | None = None  # why the spec is unusable
    estimate: Estimate | None = None
    estimate_reason: Reason | None = None  # EstimatePending / EstimateFailed when no estimate
    estimate_message: str = ""
    decision: Decision | None = None
    frozen: str | None = None  # placement frozen (e.g. UpgradeInProgress): why
    ray_service_missing: str | None = None
    ray_service_error: str | None = None  # KubeRay failure or our patch failing
    app: AppStatus | None = None
    deleting: bool = False
    activated_until: datetime | None = None  # activateOnRequest window (kept in status)
    activated: bool = False  # Hot on request right now (desired_level is then Hot)
    schedule: ModelSchedule | None = None  # status.schedule: calendar bookings of this model
    scheduled: ScheduledState | None = None  # the Scheduled condition (None: never booked)
    gpu_wait: str | None = None  # the gateway's word that a replica waits for a GPU another model holds


def _condition(kind: ConditionType, status: ConditionStatus, reason: Reason, message: str,
               generation: int, old: Mapping[str, Mapping[str, Any]], now: datetime) -> Condition:
    previous = old.get(kind.value)
    since = now
    if previous is not None and previous.get("status") == status.value and previous.get("lastTransitionTime"):
        since = datetime.fromisoformat(str(previous["lastTransitionTime"]))
    return Condition(type=kind.value, status=status, reason=reason.value, message=message[:1024],
                     last_transition_time=since, observed_generation=generation)


def _evaluated(obs: Observation) -> tuple[ConditionStatus, Reason, str]:
    if obs.invalid is not None:
        return ConditionStatus.FALSE, Reason.INVALID_SPEC, obs.invalid
    if obs.estimate is not None:
        total = human_bytes(obs.estimate.total_bytes)
        return ConditionStatus.TRUE, Reason.ESTIMATED, f"{total} per replica ({obs.estimate.method})"
    return ConditionStatus.FALSE, obs.estimate_reason or Reason.ESTIMATE_PENDING, obs.estimate_message


def _placed(obs: Observation, old: Mapping[str, Mapping[str, Any]]) -> tuple[ConditionStatus, Reason, str]:
    if obs.invalid is not None:
        return ConditionStatus.FALSE, Reason.INVALID_SPEC, obs.invalid
    if obs.ray_service_missing is not None:
        return ConditionStatus.FALSE, Reason.RAY_SERVICE_MISSING, obs.ray_service_missing
    if obs.frozen is not None:
        previous = old.get(ConditionType.PLACED.value)
        status = ConditionStatus(str(previous["status"])) if previous else ConditionStatus.UNKNOWN
        return status, Reason.UPGRADE_IN_PROGRESS, obs.frozen
    if obs.decision is None and obs.ray_service_error is not None:
        return ConditionStatus.FALSE, Reason.RAY_SERVICE_ERROR, obs.ray_service_error
    if obs.estimate is None and obs.estimate_reason == Reason.ESTIMATE_FAILED:
        # The planner only knows "unsized"; a failed estimate is no wait (see Evaluated for why).
        return ConditionStatus.FALSE, Reason.ESTIMATE_FAILED, "not placed: the model could not be sized"
    if obs.decision is None:
        return ConditionStatus.FALSE, obs.estimate_reason or Reason.ESTIMATE_PENDING, "waiting for an estimate"
    decision = obs.decision
    as_asked = decision.reason in _PLACED_AS_ASKED and decision.level == obs.desired_level
    message = decision.message or f"granted {decision.level}"
    if obs.activated and obs.activated_until is not None and as_asked:
        until = obs.activated_until.isoformat().replace("+00:00", "Z")
        message = f"Hot on request until {until} (spec level Warm, activateOnRequest); {message}"
    return (ConditionStatus.TRUE if as_asked else ConditionStatus.FALSE), Reason(decision.reason), message


def _ready(obs: Observation, level: Level | None) -> tuple[ConditionStatus, Reason, str]:
    if obs.ray_service_missing is not None:
        return ConditionStatus.FALSE, Reason.RAY_SERVICE_MISSING, obs.ray_service_missing
    if obs.ray_service_error is not None:
        return ConditionStatus.FALSE, Reason.RAY_SERVICE_ERROR, obs.ray_service_error
    if level != Level.HOT:
        return ConditionStatus.FALSE, Reason.NOT_SERVED, f"level {level or 'none'}: no replica serves traces"
    app = obs.app
    if app is None:
        missing = "the Serve application is not in the RayService status yet"
        return ConditionStatus.FALSE, Reason.APPLICATION_MISSING, missing
    if app.unschedulable:
        # Ray cannot place what the planner placed: say so with Ray's own words, never silently.
        return ConditionStatus.FALSE, Reason.REPLICAS_UNSCHEDULABLE, app.unschedulable
    if obs.gpu_wait and app.status != "RUNNING":
        return ConditionStatus.FALSE, Reason.WAITING_FOR_GPU, f"a replica is {obs.gpu_wait}"
    if app.status == "RUNNING":
        return ConditionStatus.TRUE, Reason.APPLICATION_RUNNING, app.message
    if app.status == "DEPLOY_FAILED":
        return ConditionStatus.FALSE, Reason.APPLICATION_FAILED, app.message or "deploy failed"
    if app.status == "UNHEALTHY":
        return ConditionStatus.FALSE, Reason.APPLICATION_UNHEALTHY, app.message or "unhealthy"
    return ConditionStatus.FALSE, Reason.APPLICATION_DEPLOYING, app.message or app.status


def compute_status(obs: Observation, old_status: Mapping[str, Any] | None, now: datetime) -> dict[str, Any]:
    """The whole new `status` (wire form, camelCase) for one object."""
    old = dict(old_status or {})
    old_conditions = {str(c.get("type")): c for c in old.get("conditions") or []}
    decision = obs.decision
    frozen = obs.frozen is not None or obs.ray_service_missing is not None
    level: Level | None = Level(decision.level) if decision is not None else None
    placement: Placement | None = None
    granted = 0
    if decision is not None:
        granted = decision.replicas
        placement = Placement(worker_group=decision.worker_group or "", gpus_per_replica=decision.gpus_per_replica,
                              gpu_fraction=decision.gpu_fraction, replicas=decision.replicas,
                              tensor_parallel_size=max(1, decision.tensor_parallel_size),
                              since=decision.since or now) if decision.worker_group else None
        if placement is not None and not decision.moved and old.get("placement", {}).get("since"):
            placement = placement.model_copy(update={"since": datetime.fromisoformat(
                str(old["placement"]["since"]))})
    elif frozen and old.get("level"):
        # Nothing moves while frozen: keep what the last plan granted.
        level = Level(old["level"])
        granted = int(old.get("replicas") or 0)
        placement = Placement.model_validate(old["placement"]) if old.get("placement") else None
    evaluated = _evaluated(obs)
    placed = _placed(obs, old_conditions)
    ready = _ready(obs, level)
    conditions = [
        _condition(ConditionType.EVALUATED, *evaluated, obs.generation, old_conditions, now),
        _condition(ConditionType.PLACED, *placed, obs.generation, old_conditions, now),
        _condition(ConditionType.READY, *ready, obs.generation, old_conditions, now),
    ]
    if obs.scheduled is not None:
        booked = obs.scheduled
        conditions.append(_condition(ConditionType.SCHEDULED, booked.status, booked.reason, booked.message,
                                     obs.generation, old_conditions, now))
    ready_replicas = granted if ready[0] == ConditionStatus.TRUE else 0
    reasons = {evaluated[1], placed[1], ready[1]}
    if obs.deleting:
        phase = Phase.TERMINATING
    elif reasons & _FAILED_REASONS:
        phase = Phase.FAILED
    elif level is None:
        phase = Phase.PENDING
    elif level == Level.HOT:
        phase = Phase.READY if ready[0] == ConditionStatus.TRUE else Phase.DEPLOYING
    else:
        phase = Phase.WARM if level == Level.WARM else Phase.COLD
    message = next((m for s, _, m in (evaluated, placed, ready) if s != ConditionStatus.TRUE and m), "")
    if ready[0] == ConditionStatus.TRUE and placed[0] == ConditionStatus.TRUE:
        message = ""
    if obs.scheduled is not None and obs.scheduled.reason == Reason.SCHEDULE_CONFLICT and not message:
        message = obs.scheduled.message
    estimate = obs.estimate
    if estimate is not None and not estimate.total:
        estimate = estimate.model_copy(update={"total": human_bytes(estimate.total_bytes)})
    status = ModelDeploymentStatus(
        observed_generation=obs.generation, level=level, phase=phase.value, conditions=conditions,
        estimate=estimate, placement=placement, replicas=granted, ready_replicas=ready_replicas,
        message=message[:1024], activated_until=obs.activated_until, schedule=obs.schedule,
    )
    result: dict[str, Any] = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    return result


def status_changed(old_status: Mapping[str, Any] | None, new_status: Mapping[str, Any]) -> bool:
    return dict(old_status or {}) != dict(new_status)


@dataclass(frozen=True, slots=True)
class Transition:
    condition: str
    status: str
    reason: str
    message: str
    warning: bool


def transitions(old_status: Mapping[str, Any] | None, new_status: Mapping[str, Any]) -> list[Transition]:
    """One entry per condition whose status or reason changed (what Events are posted for)."""
    old = {str(c.get("type")): c for c in (old_status or {}).get("conditions") or []}
    result = []
    for condition in new_status.get("conditions") or []:
        before = old.get(str(condition["type"]))
        if before is not None and (before.get("status"), before.get("reason")) == (
                condition["status"], condition["reason"]):
            continue
        warning = condition["status"] == "False" and condition["reason"] in _WARNING_REASONS
        # Events mark what a user acts on: placements, readiness gained, and every failure; the
        # routine steps in between (estimated, deploying, not yet reported) stay in the status.
        routine = not warning and (condition["type"] == "Evaluated" or condition["status"] != "True")
        if routine and condition["type"] not in ("Placed", "Scheduled") and condition["reason"] not in _NOTED_REASONS:
            continue
        result.append(Transition(str(condition["type"]), str(condition["status"]), str(condition["reason"]),
                                 str(condition.get("message") or ""), warning))
    return result

"""The status vocabulary of a ModelDeployment: condition types, reasons and phases.

Named constants (KubeRay style) so that the operator, the tests and the docs agree on every
string a user can see in `kubectl describe`. Reasons are CamelCase, as Kubernetes asks.
"""

from __future__ import annotations

from enum import StrEnum


class ConditionType(StrEnum):
    """The conditions every ModelDeployment carries."""

    EVALUATED = "Evaluated"  # the memory estimate is known
    PLACED = "Placed"  # the planner granted a level and a placement
    READY = "Ready"  # the model's Serve application is RUNNING and healthy
    SCHEDULED = "Scheduled"  # a calendar booking holds the model dedicated (only on booked models)


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Reason(StrEnum):
    """Why a condition has its status. One vocabulary for all three condition types."""

    # Evaluated
    ESTIMATED = "Estimated"  # sized from checkpoint headers / config, no weights read
    ESTIMATE_PENDING = "EstimatePending"  # waiting on the evaluator (e.g. the runtime-side fallback)
    ESTIMATE_FAILED = "EstimateFailed"  # the checkpoint could not be sized; see message
    # Placed
    PLACED_HOT = "PlacedHot"  # on GPUs
    PLACED_WARM = "PlacedWarm"  # held in CPU RAM, ready to become Hot without a reload
    PLACED_COLD = "PlacedCold"  # on disk / object store only, as requested
    INSUFFICIENT_GPU = "InsufficientGpu"  # asked for Hot, no GPU room; kept Warm or Cold
    INSUFFICIENT_MEMORY = "InsufficientMemory"  # neither GPU nor CPU RAM room: Cold
    EVICTED = "Evicted"  # displaced by a higher-priority or dedicated model
    MOVED = "Moved"  # still Hot, but some replicas now run elsewhere (the message says from where to where, why)
    UPGRADE_IN_PROGRESS = "UpgradeInProgress"  # RayService is switching clusters; nothing moves
    INVALID_SPEC = "InvalidSpec"  # rejected by validation the CRD cannot express
    # Ready
    APPLICATION_RUNNING = "ApplicationRunning"
    APPLICATION_DEPLOYING = "ApplicationDeploying"
    APPLICATION_FAILED = "ApplicationFailed"
    APPLICATION_UNHEALTHY = "ApplicationUnhealthy"
    APPLICATION_MISSING = "ApplicationMissing"  # not (yet) in the RayService status
    REPLICAS_UNSCHEDULABLE = "ReplicasUnschedulable"  # Ray cannot place some replicas (its reason in message)
    WAITING_FOR_GPU = "WaitingForGpu"  # a replica waits for its GPU share, still held by another (message: whose)
    NOT_SERVED = "NotServed"  # Warm or Cold: no Serve replica is expected to answer traces
    RAY_SERVICE_MISSING = "RayServiceMissing"
    RAY_SERVICE_ERROR = "RayServiceError"  # KubeRay reported a failure (see message)
    # Scheduled (calendar bookings)
    SCHEDULED_DEDICATED = "ScheduledDedicated"  # booked now: planned dedicated Hot until the end
    SCHEDULE_ENDED = "ScheduleEnded"  # the last booking ended: back to the spec
    SCHEDULE_CONFLICT = "ScheduleConflict"  # booked now but cannot be honoured (see message)


class Phase(StrEnum):
    """A one-word summary of where a ModelDeployment stands (`kubectl get` friendly)."""

    PENDING = "Pending"  # accepted, not yet evaluated/placed
    DEPLOYING = "Deploying"  # placed Hot, Serve app not ready yet
    READY = "Ready"  # Hot and serving
    WARM = "Warm"  # held in CPU RAM
    COLD = "Cold"  # on disk / object store
    FAILED = "Failed"  # cannot proceed without a change to the spec or the cluster
    TERMINATING = "Terminating"

"""The pure placement planner: inventory + requests → plan. No Kubernetes, no Ray, no I/O."""

from ndif_operator.planning.planner import plan
from ndif_operator.planning.types import (
    FRACTION_UNITS,
    CurrentPlacement,
    Decision,
    Inventory,
    PlacementRequest,
    Plan,
    ReplicaPlacement,
    WorkerGroup,
)

__all__ = [
    "FRACTION_UNITS",
    "CurrentPlacement",
    "Decision",
    "Inventory",
    "PlacementRequest",
    "Plan",
    "ReplicaPlacement",
    "WorkerGroup",
    "plan",
]

"""The one request builder: a ModelDeployment (+ its estimate and last placement) → PlacementRequest.

The operator, local mode and `ndif-operator plan` all call `placement_request`, so that the same
manifest asks the planner for the same thing everywhere (replicas, autoscaling bounds, TP size,
priority, level). Pure.
"""

from __future__ import annotations

from ndif_operator.api import Estimate, Level, ModelDeployment
from ndif_operator.planning.types import CurrentPlacement, PlacementRequest


def wanted_replicas(md: ModelDeployment) -> int:
    """The replicas the planner reserves room for: with autoscaling, the most Serve may start.

    The renderer then lets Serve scale between `autoscaling.minReplicas` and what was granted.
    """
    spec = md.spec
    return spec.autoscaling.max_replicas if spec.autoscaling is not None else spec.replicas


def placement_request(key: str, md: ModelDeployment, estimate: Estimate | None,
                      current: CurrentPlacement | None = None, *, hot: bool = False) -> PlacementRequest:
    """The planner's view of `md` (key `namespace/name`).

    `hot`: activated on request (docs/operator.md "Activation on request"): asked for Hot whatever
    its spec level. `current`: where it is now (from its status), so that the plan stays stable.
    """
    spec = md.spec
    return PlacementRequest(
        key=key,
        total_bytes=estimate.total_bytes if estimate else None,
        weights_bytes=estimate.weights_bytes if estimate else None,
        parallel=estimate.parallel if estimate else None,
        rank_bytes=tuple((r.tensor_parallel_size, r.bytes) for r in estimate.ranks) if estimate else (),
        level=Level.HOT if hot else Level(spec.level),
        replicas=wanted_replicas(md),
        tensor_parallel_size=spec.tensor_parallel_size,
        priority=spec.priority,
        dedicated=spec.dedicated,
        minimum_deployment_seconds=spec.minimum_deployment_seconds,
        current=current,
    )

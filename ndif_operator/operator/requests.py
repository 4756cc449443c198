"""ModelDeployment (+ its estimate and last placement) → the planner's PlacementRequest. Pure."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from ndif_operator.api import Estimate, Level, ModelDeployment
from ndif_operator.planning import CurrentPlacement, Decision, PlacementRequest, ReplicaPlacement

# Where each replica sits (pod, GPUs, fraction): the planner keeps it stable across passes and
# restarts, and the status has no room for it, so it lives in an annotation the operator owns.
ASSIGNMENTS_ANNOTATION = "ndif.dev/assignments"


def encode_assignments(decision: Decision) -> str:
    return json.dumps([[a.pod, list(a.gpus), a.fraction] for a in decision.assignments], separators=(",", ":"))


def decode_assignments(text: str | None) -> tuple[ReplicaPlacement, ...]:
    if not text:
        return ()
    try:
        return tuple(ReplicaPlacement(pod=int(p), gpus=tuple(int(g) for g in gpus), fraction=float(f))
                     for p, gpus, f in json.loads(text))
    except (ValueError, TypeError):
        return ()  # a hand-edited annotation only costs stability, never correctness


def current_placement(status: Mapping[str, Any] | None, annotations: Mapping[str, str]) -> CurrentPlacement | None:
    if not status or not status.get("level"):
        return None
    placement = status.get("placement") or {}
    since_text = placement.get("since")
    since = datetime.fromisoformat(str(since_text)) if since_text else None
    return CurrentPlacement(level=Level(status["level"]), worker_group=placement.get("workerGroup") or None,
                            replicas=decode_assignments(annotations.get(ASSIGNMENTS_ANNOTATION)), since=since)


def placement_request(key: str, md: ModelDeployment, estimate: Estimate | None,
                      current: CurrentPlacement | None) -> PlacementRequest:
    spec = md.spec
    # With autoscaling the planner reserves room for the most replicas Serve may start.
    replicas = spec.autoscaling.max_replicas if spec.autoscaling is not None else spec.replicas
    return PlacementRequest(
        key=key,
        total_bytes=estimate.total_bytes if estimate else None,
        weights_bytes=estimate.weights_bytes if estimate else None,
        level=Level(spec.level),
        replicas=replicas,
        tensor_parallel_size=spec.tensor_parallel_size,
        priority=spec.priority,
        dedicated=spec.dedicated,
        minimum_deployment_seconds=spec.minimum_deployment_seconds,
        current=current,
    )

"""Where a ModelDeployment is now (status + assignments annotation), for the shared request builder. Pure."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from ndif_operator.api import Level
from ndif_operator.planning import CurrentPlacement, Decision, ReplicaPlacement
from ndif_operator.planning.requests import placement_request

__all__ = ["ASSIGNMENTS_ANNOTATION", "current_placement", "decode_assignments", "encode_assignments",
           "placement_request"]

# Where each replica sits (pod, GPUs, fraction): the planner keeps it stable across passes and
# restarts, and the status has no room for it, so it lives in an annotation the operator owns.
ASSIGNMENTS_ANNOTATION = "ndif.dev/assignments"


def encode_assignments(decision: Decision) -> str:
    return json.dumps([[a.pod, list(a.gpus), a.fraction, *([a.group] if a.group is not None else [])]
                       for a in decision.assignments], separators=(",", ":"))


def decode_assignments(text: str | None) -> tuple[ReplicaPlacement, ...]:
    if not text:
        return ()
    try:
        return tuple(ReplicaPlacement(pod=int(p), gpus=tuple(int(g) for g in gpus), fraction=float(f),
                                      group=str(rest[0]) if rest else None)
                     for p, gpus, f, *rest in json.loads(text))
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

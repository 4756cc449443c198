"""The operator's Prometheus metrics (their own module, imported once: kopf re-imports handler files).

Per ModelDeployment, the wanted and granted level are numbers (`LEVEL_VALUE`: Cold 0, Warm 1,
Hot 2), so "wanted Hot but not placed" is `wanted > granted` in PromQL and alertable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

RECONCILES = Counter("ndif_operator_reconcile_total", "Planner passes by result.", ["result"], registry=REGISTRY)
RECONCILE_SECONDS = Histogram("ndif_operator_reconcile_duration_seconds", "Duration of one planner pass.",
                              registry=REGISTRY)
PLAN_SECONDS = Histogram("ndif_operator_plan_duration_seconds", "Duration of plan() for one RayService.",
                         registry=REGISTRY)
DEPLOYMENTS = Gauge("ndif_operator_deployments", "ModelDeployments by granted level.", ["level"], registry=REGISTRY)
GPUS_PLANNED = Gauge("ndif_operator_gpus_planned", "GPUs with at least one planned replica.", ["ray_service"],
                     registry=REGISTRY)
GPUS_AVAILABLE = Gauge("ndif_operator_gpus_available", "GPUs in the RayService's worker groups.", ["ray_service"],
                       registry=REGISTRY)
PATCHES = Counter("ndif_operator_rayservice_patches_total", "serveConfigV2 patches by result.", ["result"],
                  registry=REGISTRY)
API_ERRORS = Counter("ndif_operator_api_errors_total", "Kubernetes API requests that failed, by HTTP status "
                     "(0: no answer: unreachable, timed out).", ["code"], registry=REGISTRY)
STATUS_WRITES = Counter("ndif_operator_status_writes_total", "ModelDeployment status writes.", registry=REGISTRY)

LEVEL_VALUE = {"Cold": 0, "Warm": 1, "Hot": 2}
_MD = ["namespace", "modeldeployment"]
WANTED_LEVEL = Gauge("ndif_operator_modeldeployment_wanted_level", "Level asked for (spec.level): Cold 0, Warm 1, "
                     "Hot 2.", _MD, registry=REGISTRY)
GRANTED_LEVEL = Gauge("ndif_operator_modeldeployment_granted_level", "Level granted (status.level): Cold 0, "
                      "Warm 1, Hot 2; -1 before the first decision.", _MD, registry=REGISTRY)
GPU_MEMORY = Gauge("ndif_operator_modeldeployment_gpu_memory_bytes", "Estimated GPU memory of one replica while "
                   "granted Hot (all its GPUs), else 0.", _MD, registry=REGISTRY)
GPUS_PER_REPLICA = Gauge("ndif_operator_modeldeployment_gpus_per_replica", "GPU share one replica holds.", _MD,
                         registry=REGISTRY)
LEVEL_CHANGES = Counter("ndif_operator_level_changes_total", "Granted-level changes of ModelDeployments.",
                        ["from_level", "to_level"], registry=REGISTRY)

_granted: dict[tuple[str, str], str] = {}


def observe_deployment(namespace: str, name: str, wanted: str | None, status: Mapping[str, Any]) -> None:
    """Export one ModelDeployment's wanted/granted level and GPU memory from its (new) status."""
    key = (namespace, name)
    granted = str(status.get("level") or "")
    if wanted is not None:
        WANTED_LEVEL.labels(*key).set(LEVEL_VALUE.get(str(wanted), -1))
    GRANTED_LEVEL.labels(*key).set(LEVEL_VALUE.get(granted, -1))
    estimate = status.get("estimate") or {}
    placement = status.get("placement") or {}
    hot = granted == "Hot"
    GPU_MEMORY.labels(*key).set(float(estimate.get("totalBytes") or 0) if hot else 0.0)
    GPUS_PER_REPLICA.labels(*key).set(float(placement.get("gpusPerReplica") or 0) if hot else 0.0)
    before = _granted.get(key)
    if granted and before and before != granted:
        LEVEL_CHANGES.labels(before, granted).inc()
    if granted:
        _granted[key] = granted


def keep_deployments(existing: Iterable[tuple[str, str]]) -> None:
    """Drop the series of ModelDeployments that no longer exist."""
    alive = set(existing)
    for gauge in (WANTED_LEVEL, GRANTED_LEVEL, GPU_MEMORY, GPUS_PER_REPLICA):
        for labels in list(gauge._metrics):  # prometheus_client keeps children by label tuple
            if labels not in alive:
                gauge.remove(*labels)
    for key in [k for k in _granted if k not in alive]:
        del _granted[key]


_started: set[int] = set()


def serve(port: int) -> None:
    """Expose the metrics on `port` (once per process; 0 disables)."""
    if port and port not in _started:
        start_http_server(port, addr="0.0.0.0", registry=REGISTRY)
        _started.add(port)

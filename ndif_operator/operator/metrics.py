"""The operator's Prometheus metrics (their own module, imported once: kopf re-imports handler files)."""

from __future__ import annotations

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
STATUS_WRITES = Counter("ndif_operator_status_writes_total", "ModelDeployment status writes.", registry=REGISTRY)

_started: set[int] = set()


def serve(port: int) -> None:
    """Expose the metrics on `port` (once per process; 0 disables)."""
    if port and port not in _started:
        start_http_server(port, addr="0.0.0.0", registry=REGISTRY)
        _started.add(port)

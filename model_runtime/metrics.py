"""Runtime metrics: Prometheus through Ray's metrics agent, optional InfluxDB points.

Ray Serve replicas export `ray.serve.metrics` to the cluster's Prometheus endpoint (every node's
metrics agent), so that is the Prometheus path here; the same numbers are kept in a plain
in-process snapshot that `/status` and tests read. Tags are the model key, outcome, error kind
and refusal reason only: never API keys, job ids or anything from a request body (a refused
request for a model that is not deployed is tagged `unknown`, so callers cannot mint series).

Ray prefixes every name with `ray_` and counters get `_total` (measured on Ray 2.60): the code's
`ndif_requests` is scraped as `ray_ndif_requests_total`, `ndif_request_seconds` as
`ray_ndif_request_seconds_bucket/_sum/_count`. `EXPORTED` lists the scraped names; dashboards
and alerts use those, and a test checks every name they use is in it.

Ray stops exporting a gauge some time after its last `set`, so the queue depth is re-set every
`KEEPALIVE_SECONDS` by a daemon thread: an idle model reports 0 instead of vanishing.

InfluxDB is optional (NDIF_INFLUX_URL, NDIF_INFLUX_ORG, NDIF_INFLUX_BUCKET, and the token
NDIF_INFLUX_TOKEN, read as a credential: model_runtime/credentials.py). Only the gateway writes
points, because writing needs the token and a model replica, which runs users' code, holds no
credential: `RuntimeMetrics.request` returns the replica's *report* (the request's figures and any
model loads not reported yet), the replica sends it in its reply's final event, and the gateway
writes it (`GatewayMetrics.replica_report`). The gateway takes only numbers and a fixed
vocabulary from a report, and tags points with the model it routed the request to.
"""

from __future__ import annotations

import atexit
import logging
import math
import threading
from collections import defaultdict, deque
from typing import Any

from model_runtime.settings import RuntimeSettings

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 15.0

# name in the code → (kind, tag keys); the one list both the metric objects and EXPORTED come from.
REPLICA_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ndif_requests": ("counter", ("model", "outcome")),
    "ndif_request_errors": ("counter", ("model", "kind")),
    "ndif_request_seconds": ("histogram", ("model",)),
    "ndif_request_bytes": ("counter", ("model",)),
    "ndif_result_bytes": ("counter", ("model",)),
    "ndif_queue_depth": ("gauge", ("model",)),
    "ndif_model_load_seconds": ("histogram", ("model", "source")),
}
GATEWAY_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ndif_gateway_refusals": ("counter", ("model", "reason")),
    "ndif_gateway_requests": ("counter", ("model",)),
    "ndif_result_store_failures": ("counter", ("store",)),
}


def exported_names(name: str, kind: str) -> tuple[str, ...]:
    """The series names Prometheus scrapes for one of our Ray metrics."""
    base = f"ray_{name}"
    if kind == "counter":
        return (f"{base}_total",)
    if kind == "histogram":
        return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
    return (base,)


EXPORTED: frozenset[str] = frozenset(
    series for table in (REPLICA_METRICS, GATEWAY_METRICS) for name, (kind, _) in table.items()
    for series in exported_names(name, kind)
)

# HTTP status of a gateway refusal → the `reason` tag.
REFUSAL_REASONS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 413: "too_large",
                   503: "unavailable"}


def error_kind(error: str | None, *, timed_out: bool = False) -> str:
    """A small fixed vocabulary for a failed request (the `kind` tag): never the text itself."""
    if timed_out:
        return "timeout"
    text = error or ""
    if text.startswith("[") and "]" in text:
        return "sandbox_" + text[1:text.index("]")].strip().replace(" ", "_")[:24]
    if text.startswith("Internal error"):
        return "internal"
    if text.startswith("Unreadable request payload"):
        return "unreadable"
    if "exceeds this model's limit" in text:
        return "result_too_large"
    return "user_code"


_LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300]
_LOAD_BOUNDARIES = [0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800]


class _Influx:
    """Batched writes on a background thread: a slow or absent InfluxDB never delays a request.
    Made by the gateway only (it holds the token)."""

    def __init__(self) -> None:
        self._api: Any = None
        self._client: Any = None
        settings = RuntimeSettings.from_env()
        if not settings.influx_url:
            return
        try:
            import influxdb_client
            from influxdb_client.client.write_api import WriteOptions

            from model_runtime import credentials

            influx: Any = influxdb_client  # untyped package
            self._client = influx.InfluxDBClient(
                url=settings.influx_url, token=credentials.current().get(credentials.INFLUX_TOKEN) or "",
                org=settings.influx_org,
            )
            self._api = self._client.write_api(
                write_options=WriteOptions(batch_size=500, flush_interval=5_000, max_retries=2)
            )
            self._bucket = settings.influx_bucket
        except Exception as exc:  # metrics must never take a replica down
            log.warning("InfluxDB disabled: %s", exc)

    def write(self, measurement: str, tags: dict[str, str], fields: dict[str, float]) -> None:
        if self._api is None:
            return
        try:
            import influxdb_client

            influx: Any = influxdb_client
            point = influx.Point(measurement)
            for k, v in tags.items():
                point = point.tag(k, v)
            for k, f in fields.items():
                point = point.field(k, float(f))
            self._api.write(bucket=self._bucket, record=point)
        except Exception as exc:
            log.warning("InfluxDB write failed: %s", exc)

    def close(self) -> None:
        """Flush what is batched (replica shutdown, tests)."""
        if self._api is not None:
            self._api.close()
            self._client.close()
            self._api = None


_HELP = {
    "ndif_requests": "Requests by model and outcome.",
    "ndif_request_errors": "Failed requests by model and error kind.",
    "ndif_request_seconds": "Request execution time.",
    "ndif_request_bytes": "Request payload bytes.",
    "ndif_result_bytes": "Result bytes.",
    "ndif_queue_depth": "Requests waiting for the model.",
    "ndif_model_load_seconds": "Model load/activation time by source.",
    "ndif_gateway_refusals": "Requests the gateway refused, by model and reason.",
    "ndif_gateway_requests": "Requests the gateway admitted, by model.",
    "ndif_result_store_failures": "Results that could not be stored for download.",
}
_BOUNDARIES = {"ndif_request_seconds": _LATENCY_BOUNDARIES, "ndif_model_load_seconds": _LOAD_BOUNDARIES}


def _ray_metrics(table: dict[str, tuple[str, tuple[str, ...]]]) -> dict[str, Any]:
    """The Ray metric objects of `table`, or {} outside a Ray worker (unit tests: snapshot only)."""
    try:
        from ray.serve import metrics as ray_metrics
    except Exception as exc:
        log.debug("Ray metrics unavailable: %s", exc)
        return {}
    m: Any = ray_metrics  # its tag_keys annotation wants a 1-tuple
    made: dict[str, Any] = {}
    for name, (kind, tags) in table.items():
        try:
            if kind == "counter":
                made[name] = m.Counter(name, _HELP[name], tag_keys=tags)
            elif kind == "gauge":
                made[name] = m.Gauge(name, _HELP[name], tag_keys=tags)
            else:
                made[name] = m.Histogram(name, _HELP[name], _BOUNDARIES[name], tag_keys=tags)
        except Exception as exc:  # metrics must never take a replica down
            log.debug("Ray metric %s unavailable: %s", name, exc)
    return made


def _emit(metrics: dict[str, Any], name: str, method: str, value: float, tags: dict[str, str]) -> None:
    metric = metrics.get(name)
    if metric is not None:
        try:
            getattr(metric, method)(value, tags=tags)
        except Exception as exc:
            log.debug("metric %s failed: %s", name, exc)


# A replica's report (see the module's docstring): what the gateway accepts from one.
OUTCOMES = ("completed", "error", "timeout", "rejected")
# The `source` of a load: a ModelDeployment source kind, the node's weight store, or an activation
# (the replica's model_load calls; a test checks they stay inside this set).
LOAD_SOURCES = frozenset({"huggingFace", "localPath", "s3", "nodeMemory", "activate_from_warm", "activate_from_cold"})
MAX_REPORTED_LOADS = 8


class RuntimeMetrics:
    """One per replica process: Prometheus through Ray, and the reports the gateway writes to InfluxDB."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot: dict[str, float] = defaultdict(float)
        self._ray = _ray_metrics(REPLICA_METRICS)
        self._queues: dict[str, int] = {}
        self._loads: deque[dict[str, Any]] = deque(maxlen=MAX_REPORTED_LOADS)  # not reported yet
        self._stop = threading.Event()
        if self._ray:
            threading.Thread(target=self._keep_gauges, name="ndif-metrics-keepalive", daemon=True).start()

    def _keep_gauges(self) -> None:
        while not self._stop.wait(KEEPALIVE_SECONDS):
            with self._lock:
                queues = dict(self._queues)
            for model, depth in queues.items():
                self._emit("ndif_queue_depth", "set", depth, {"model": model})

    def _emit(self, name: str, method: str, value: float, tags: dict[str, str]) -> None:
        _emit(self._ray, name, method, value, tags)

    def request(self, model: str, outcome: str, seconds: float, bytes_in: int, bytes_out: int,
                kind: str = "") -> dict[str, Any]:
        """One finished (or refused) request; `kind` is the error kind of a failed one (see error_kind).

        Returns the report for the gateway (its reply's final event carries it): this request's
        figures and the model loads since the last report."""
        report = self.request_report(outcome, seconds, bytes_in, bytes_out, kind)
        self.export_request(model, report, kind)
        return report

    def request_report(self, outcome: str, seconds: float, bytes_in: int, bytes_out: int,
                       kind: str = "") -> dict[str, Any]:
        """`request` without the Prometheus export: the snapshot and the gateway's report only (a
        replica exports after it has sent the request's final event: `export_request`)."""
        with self._lock:
            self._snapshot[f"requests_{outcome}"] += 1
            self._snapshot["request_seconds_sum"] += seconds
            self._snapshot["bytes_in"] += bytes_in
            self._snapshot["bytes_out"] += bytes_out
            if kind:
                self._snapshot[f"errors_{kind}"] += 1
            loads = list(self._loads)
            self._loads.clear()
        return {"outcome": outcome, "seconds": seconds, "bytes_in": bytes_in, "bytes_out": bytes_out,
                "loads": loads}

    def export_request(self, model: str, report: dict[str, Any], kind: str = "") -> None:
        """The Prometheus side of `request` for a report made by `request_report`."""
        outcome = report["outcome"]
        self._emit("ndif_requests", "inc", 1, {"model": model, "outcome": outcome})
        if kind:
            self._emit("ndif_request_errors", "inc", 1, {"model": model, "kind": kind})
        self._emit("ndif_request_seconds", "observe", report["seconds"], {"model": model})
        self._emit("ndif_request_bytes", "inc", report["bytes_in"], {"model": model})
        if report["bytes_out"]:
            self._emit("ndif_result_bytes", "inc", report["bytes_out"], {"model": model})

    def queue_depth(self, model: str, depth: int) -> None:
        """The model's queue depth now; exported when it changed (the keep-alive thread re-sets it)."""
        with self._lock:
            self._snapshot["queue_depth"] = depth
            changed = self._queues.get(model) != depth
            self._queues[model] = depth
        if changed:
            self._emit("ndif_queue_depth", "set", depth, {"model": model})

    def model_load(self, model: str, source: str, seconds: float) -> None:
        with self._lock:
            self._snapshot[f"load_seconds_{source}"] = seconds
            self._loads.append({"source": source, "seconds": seconds})
        self._emit("ndif_model_load_seconds", "observe", seconds, {"model": model, "source": source})

    def close(self) -> None:
        self._stop.set()

    @property
    def exporting(self) -> bool:
        """Whether Ray's Prometheus metrics are live in this process."""
        return bool(self._ray)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._snapshot)


def _number(value: Any) -> float | None:
    """A finite, non-negative number from a report, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None


def report_points(report: Any) -> list[tuple[str, dict[str, str], dict[str, float]]]:
    """The InfluxDB points (measurement, tags without the model, fields) of a replica's report.

    A replica runs users' code, so its report is data to check, not to trust: only the known
    fields, finite non-negative numbers, an outcome and load sources from a fixed vocabulary, at
    most `MAX_REPORTED_LOADS` loads; anything else is dropped."""
    if not isinstance(report, dict):
        return []
    points: list[tuple[str, dict[str, str], dict[str, float]]] = []
    fields = {name: _number(report.get(name)) for name in ("seconds", "bytes_in", "bytes_out")}
    if report.get("outcome") in OUTCOMES and all(v is not None for v in fields.values()):
        points.append(("request", {"outcome": str(report["outcome"])},
                       {k: v for k, v in fields.items() if v is not None}))
    loads = report.get("loads")
    for load in loads[:MAX_REPORTED_LOADS] if isinstance(loads, list) else []:
        if not isinstance(load, dict):
            continue
        source, seconds = load.get("source"), _number(load.get("seconds"))
        if isinstance(source, str) and source in LOAD_SOURCES and seconds is not None:
            points.append(("model_load", {"source": source}, {"seconds": seconds}))
    return points


class GatewayMetrics:
    """The gateway's counters (one per gateway process; see `gateway_metrics`), and the InfluxDB
    writer for the replicas' reports."""

    def __init__(self) -> None:
        self._ray = _ray_metrics(GATEWAY_METRICS)
        self._lock = threading.Lock()
        self.counts: dict[str, int] = defaultdict(int)
        self._influx = _Influx()
        atexit.register(self._influx.close)  # flush what is batched when the gateway's process ends

    def replica_report(self, model: str, report: Any) -> None:
        """Write a model replica's report (see `report_points`) as points tagged with `model`, the
        model the gateway routed the request to."""
        for measurement, tags, fields in report_points(report):
            self._influx.write(measurement, {"model": model, **tags}, fields)

    def close(self) -> None:
        """Flush what is batched (tests; the process's exit does it too)."""
        self._influx.close()

    def refusal(self, model: str, status: int) -> None:
        reason = REFUSAL_REASONS.get(status, str(status))
        with self._lock:
            self.counts[f"refused_{reason}"] += 1
        _emit(self._ray, "ndif_gateway_refusals", "inc", 1, {"model": model or "unknown", "reason": reason})

    def admitted(self, model: str) -> None:
        with self._lock:
            self.counts["admitted"] += 1
        _emit(self._ray, "ndif_gateway_requests", "inc", 1, {"model": model})

    def result_store_failure(self, store: str) -> None:
        with self._lock:
            self.counts["result_store_failures"] += 1
        _emit(self._ray, "ndif_result_store_failures", "inc", 1, {"store": store})


_gateway: GatewayMetrics | None = None


def gateway_metrics() -> GatewayMetrics:
    """Created on first use, inside the gateway's replica process (Ray metrics need a worker)."""
    global _gateway
    if _gateway is None:
        _gateway = GatewayMetrics()
    return _gateway

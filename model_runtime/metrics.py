"""Runtime metrics: Prometheus through Ray's metrics agent, optional InfluxDB points.

Ray Serve replicas export `ray.serve.metrics` to the cluster's Prometheus endpoint (every node's
metrics agent), so that is the Prometheus path here; the same numbers are kept in a plain
in-process snapshot that `/status` and tests read. Tags are the model key and outcome only:
never API keys, job ids or anything from a request body.

InfluxDB is optional: set NDIF_INFLUX_URL, NDIF_INFLUX_ORG, NDIF_INFLUX_BUCKET and
NDIF_INFLUX_TOKEN (the token is read from the environment only, never tagged or logged).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import defaultdict
from typing import Any

log = logging.getLogger(__name__)

_LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300]
_LOAD_BOUNDARIES = [0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800]


class _Influx:
    """Batched writes on a background thread: a slow or absent InfluxDB never delays a request."""

    def __init__(self) -> None:
        self._api: Any = None
        self._client: Any = None
        url = os.environ.get("NDIF_INFLUX_URL")
        if not url:
            return
        try:
            import influxdb_client
            from influxdb_client.client.write_api import WriteOptions

            influx: Any = influxdb_client  # untyped package
            self._client = influx.InfluxDBClient(
                url=url, token=os.environ.get("NDIF_INFLUX_TOKEN", ""), org=os.environ.get("NDIF_INFLUX_ORG", "")
            )
            self._api = self._client.write_api(
                write_options=WriteOptions(batch_size=500, flush_interval=5_000, max_retries=2)
            )
            self._bucket = os.environ.get("NDIF_INFLUX_BUCKET", "ndif")
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


class RuntimeMetrics:
    """One per replica process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot: dict[str, float] = defaultdict(float)
        self._ray: dict[str, Any] = {}
        try:
            from ray.serve import metrics as ray_metrics

            m: Any = ray_metrics  # its tag_keys annotation wants a 1-tuple
            self._ray = {
                "requests": m.Counter(
                    "ndif_requests", "Requests by model and outcome.", tag_keys=("model", "outcome")
                ),
                "latency": m.Histogram(
                    "ndif_request_seconds", "Request execution time.", _LATENCY_BOUNDARIES, tag_keys=("model",)
                ),
                "bytes_in": m.Counter("ndif_request_bytes", "Request payload bytes.", tag_keys=("model",)),
                "bytes_out": m.Counter("ndif_result_bytes", "Result bytes.", tag_keys=("model",)),
                "queue": m.Gauge("ndif_queue_depth", "Requests waiting for the model.", tag_keys=("model",)),
                "load": m.Histogram(
                    "ndif_model_load_seconds", "Model load/activation time by source.", _LOAD_BOUNDARIES,
                    tag_keys=("model", "source"),
                ),
            }
        except Exception as exc:  # outside a Ray worker (unit tests) the snapshot still works
            log.debug("Ray metrics unavailable: %s", exc)
        self._influx = _Influx()

    def _emit(self, name: str, method: str, value: float, tags: dict[str, str]) -> None:
        metric = self._ray.get(name)
        if metric is not None:
            try:
                getattr(metric, method)(value, tags=tags)
            except Exception as exc:
                log.debug("metric %s failed: %s", name, exc)

    def request(self, model: str, outcome: str, seconds: float, bytes_in: int, bytes_out: int) -> None:
        with self._lock:
            self._snapshot[f"requests_{outcome}"] += 1
            self._snapshot["request_seconds_sum"] += seconds
            self._snapshot["bytes_in"] += bytes_in
            self._snapshot["bytes_out"] += bytes_out
        self._emit("requests", "inc", 1, {"model": model, "outcome": outcome})
        self._emit("latency", "observe", seconds, {"model": model})
        self._emit("bytes_in", "inc", bytes_in, {"model": model})
        if bytes_out:
            self._emit("bytes_out", "inc", bytes_out, {"model": model})
        self._influx.write(
            "request", {"model": model, "outcome": outcome},
            {"seconds": seconds, "bytes_in": bytes_in, "bytes_out": bytes_out},
        )

    def queue_depth(self, model: str, depth: int) -> None:
        with self._lock:
            self._snapshot["queue_depth"] = depth
        self._emit("queue", "set", depth, {"model": model})

    def model_load(self, model: str, source: str, seconds: float) -> None:
        with self._lock:
            self._snapshot[f"load_seconds_{source}"] = seconds
        self._emit("load", "observe", seconds, {"model": model, "source": source})
        self._influx.write("model_load", {"model": model, "source": source}, {"seconds": seconds})

    def close(self) -> None:
        self._influx.close()

    @property
    def exporting(self) -> bool:
        """Whether Ray's Prometheus metrics are live in this process."""
        return bool(self._ray)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._snapshot)

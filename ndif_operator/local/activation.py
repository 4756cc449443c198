"""Local mode's activation on request: watch the local gateway, decide, re-plan when it changes.

The gateway pushes demand through a long-poll (`GET /demand`, `DemandWatcher`): the re-plan starts
as soon as a request for a Warm model is refused, not at the next poll.

The decision is the operator's (`planning.activation.activation_until`); local mode keeps the
windows in memory (a restart of local mode starts from the manifests' levels) and reads the
gateway on loopback with plain urllib, as it talks to Serve's REST API.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from datetime import datetime

from ndif_operator.api import Level, ModelDeployment
from ndif_operator.api.naming import API_KEY_HEADER
from ndif_operator.local.manifests import deployment_key
from ndif_operator.planning.activation import Demand, activation_until, demands_from_gateway_status, is_active

DEFAULT_TTL_S = 900.0


def candidates(deployments: Sequence[ModelDeployment]) -> list[ModelDeployment]:
    return [md for md in deployments if md.spec.activate_on_request and Level(md.spec.level) == Level.WARM]


def read_gateway_demands(url: str, api_key: str | None = None, *, timeout: float = 3.0) -> dict[str, Demand]:
    """`namespace/name` → demand from `<url>/status`; empty when the gateway cannot be read."""
    request = urllib.request.Request(url.rstrip("/") + "/status")
    if api_key:
        request.add_header(API_KEY_HEADER, api_key)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return {}
    return demands_from_gateway_status(body) if isinstance(body, dict) else {}


def next_windows(deployments: Sequence[ModelDeployment], demands: Mapping[str, Demand],
                 current: Mapping[str, datetime], *, now: datetime,
                 ttl_s: float = DEFAULT_TTL_S) -> dict[str, datetime]:
    """Each activateOnRequest Warm deployment's window end (past ends kept: the demand was served)."""
    windows: dict[str, datetime] = {}
    for md in candidates(deployments):
        key = deployment_key(md)
        until = activation_until(activate_on_request=True, spec_level=Level(md.spec.level), demand=demands.get(key),
                                 current_until=current.get(key), now=now,
                                 minimum_deployment_seconds=md.spec.minimum_deployment_seconds, ttl_seconds=ttl_s)
        if until is not None:
            windows[key] = until
    return windows


def active_keys(windows: Mapping[str, datetime], now: datetime) -> frozenset[str]:
    return frozenset(k for k, until in windows.items() if is_active(until, now))


def wait_for_demand(url: str, api_key: str | None, since: int, *,
                    timeout_s: float = 30.0) -> tuple[int, dict[str, Demand]] | None:
    """Long-poll the gateway's `/demand`: returns (seq, demands) as soon as a demand newer than
    `since` is recorded, or at `timeout_s`; None when the gateway cannot be read."""
    request = urllib.request.Request(f"{url.rstrip('/')}/demand?since={since}&timeout={timeout_s:g}")
    if api_key:
        request.add_header(API_KEY_HEADER, api_key)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s + 10) as response:
            body = json.loads(response.read())
        return int(body["seq"]), demands_from_gateway_status(body)
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        return None


class DemandWatcher:
    """Watches the gateway's `/demand` in a daemon thread so that a request for a Warm model
    reaches the re-plan at once (no polling interval). `wait()` returns the new demands or None."""

    def __init__(self, url: str, api_key: str | None = None, *, retry_s: float = 1.0) -> None:
        self.url, self.api_key, self.retry_s = url, api_key, retry_s
        self._seq = -1
        self._pending: dict[str, Demand] | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="demand-watcher", daemon=True)

    def start(self) -> DemandWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def wait(self, timeout: float) -> dict[str, Demand] | None:
        if not self._ready.wait(timeout):
            return None
        with self._lock:
            pending, self._pending = self._pending, None
            self._ready.clear()
        return pending

    def _run(self) -> None:
        while not self._stop.is_set():
            answer = wait_for_demand(self.url, self.api_key, self._seq)
            if answer is None:
                self._stop.wait(self.retry_s)  # gateway not up (yet): try again shortly
                continue
            seq, demands = answer
            if seq > self._seq:
                first = self._seq < 0
                self._seq = seq
                if first and seq == 0:
                    continue  # nothing requested yet: just learned where the counter is
                with self._lock:
                    self._pending = demands
                    self._ready.set()

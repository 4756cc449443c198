"""The gateway's routing table: a client key's `repo_id` (lower-cased) → its `GatewayRoute`, and the
DeploymentHandles of the model apps it names.

The table is the gateway deployment's `user_config`, replaced in place (adding or removing a model
never restarts the gateway). A model that goes COLD or leaves the table has its host copies
evicted from the nodes' weight stores, in a thread (best effort).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ray import serve

from model_runtime import weight_store
from model_runtime.model_keys import repo_key
from ndif_operator.api import GatewayRoute, GatewayUserConfig, Level

log = logging.getLogger("ray.serve")


def _served(routes: dict[str, GatewayRoute]) -> set[str]:
    return {key for key, route in routes.items() if route.app is not None and route.level != Level.COLD}


def _evict_host_copies(model_keys: list[str]) -> None:
    try:
        evicted = weight_store.evict_models(model_keys)
    except Exception as exc:  # best effort: a store that is gone holds nothing
        log.info("weight store eviction of %s failed: %r", model_keys, exc)
        return
    if evicted:
        log.info("evicted %d host copies of models now COLD: %s", evicted, model_keys)


class Routing:
    def __init__(self, static: dict[str, str]) -> None:
        """`static`: deprecated repo_id → app routes from the gateway's args; a table replaces them."""
        self._static = {repo_key(k): GatewayRoute(deployment="", level=Level.HOT, app=v, repo_id=k)
                        for k, v in static.items()}
        self.routes: dict[str, GatewayRoute] = dict(self._static)
        self._handles: dict[str, Any] = {}
        self.payload_limits: dict[str, int] = {}  # app → max_payload_bytes, learned from admissions

    def update(self, table: GatewayUserConfig) -> None:
        served_before = _served(self.routes)
        self.routes = {**self._static, **{repo_key(k): route for k, route in table.models.items()}}
        # Models that went COLD (or left the table) free their host copies in the nodes' weight stores.
        cold = (served_before - _served(self.routes)) | (set(self.routes) - _served(self.routes))
        if cold:
            threading.Thread(target=_evict_host_copies, args=(sorted(cold),), daemon=True).start()
        apps = self.apps()
        for app_name in [a for a in self._handles if a not in apps]:
            self._handles.pop(app_name, None)
            self.payload_limits.pop(app_name, None)
        log.info("gateway routes: %s", {k: (r.app, r.level) for k, r in sorted(self.routes.items())})

    def apps(self) -> set[str]:
        """The model applications the table routes to."""
        return {a for route in self.routes.values() for a in (route.apps or ([route.app] if route.app else []))}

    def handle(self, app_name: str) -> Any:
        handle = self._handles.get(app_name)
        if handle is None:
            # Its router stays on Serve's router thread: a router on this loop did not route a call
            # made while the app had no replica once one came up (the call timed out instead;
            # tests/runtime/test_gpu_lease.py shows it through /status).
            handle = serve.get_app_handle(app_name)
            self._handles[app_name] = handle
        return handle

    def forget(self, app_name: str) -> None:
        """Drop an app's handle (its app vanished or did not answer): the next call gets a fresh one."""
        self._handles.pop(app_name, None)

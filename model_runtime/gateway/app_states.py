"""The gateway's view of Serve: each application's state and RUNNING replicas, and the GPU waits of
HOT replicas.

Read from Serve's controller in one call every `STATE_REFRESH_S` seconds in the background; an app
that is not RUNNING in the cache is looked at again (at most every `STATE_RECHECK_S`) before a
request or `/status` is told so. A placement group table is read only while some app is not
RUNNING (or a wait was seen): that is when a replica may be waiting for a GPU share.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from model_runtime.gpu_waits import GpuWait, gpu_waits

log = logging.getLogger("ray.serve")

STATE_REFRESH_S = 2.0  # background refresh of the Serve application states
STATE_RECHECK_S = 0.25  # an app not RUNNING in the cache is looked at again at most this often


def app_states(details: dict[str, Any]) -> dict[str, str]:
    """Each Serve application's state by name, from Serve's instance details (`serve_details()`):
    RUNNING when some replica runs (a rolling update reports DEPLOYING while the old replicas
    still serve: routable), else the application's status ("DEPLOYING", "DEPLOY_FAILED", ...)."""
    states: dict[str, str] = {}
    for name, app_details in (details.get("applications") or {}).items():
        # The states are Serve's str enums (ReplicaState, ApplicationStatus), or their plain values.
        running = any(replica.get("state") == "RUNNING"
                      for deployment in (app_details.get("deployments") or {}).values()
                      for replica in deployment.get("replicas") or ())
        # `str()` of a str enum is "ApplicationStatus.DEPLOYING" on Python 3.11: take its value.
        status = app_details.get("status") or "NOT_STARTED"
        states[name] = "RUNNING" if running else str(getattr(status, "value", status))
    return states


def channel_replicas(details: dict[str, Any]) -> dict[str, frozenset[str]]:
    """Each Serve application's RUNNING replicas by id (`ReplicaDetails.replica_id`, the replica
    context's `replica_id.unique_id`), for the apps the gateway's direct channel may serve: it is used
    only for an app whose one RUNNING replica is the channel's. An app whose deployment autoscales is
    left out: Serve's autoscaler counts the requests its handles route, so requests over the channel
    would look like no load and a busy replica could be scaled away."""
    replicas: dict[str, frozenset[str]] = {}
    for name, app_details in (details.get("applications") or {}).items():
        deployments = list((app_details.get("deployments") or {}).values())
        if any((d.get("deployment_config") or {}).get("autoscaling_config") for d in deployments):
            continue
        replicas[name] = frozenset(str(replica.get("replica_id")) for deployment in deployments
                                   for replica in deployment.get("replicas") or ()
                                   if replica.get("state") == "RUNNING")
    return replicas


def serve_details() -> dict[str, Any]:
    """Serve's instance details as its controller sends them: a dict in the shape of Serve's REST
    API (`GET /api/serve/applications/`). `serve.status()` reads the same and then builds pydantic
    models of it, which pickles every deployment's request-router class: about 11 ms more of this
    process's CPU, holding its GIL, per read on a 2-core x86_64 box (every 2 s)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return dict(client.get_serve_details()) if client is not None else {}


class AppStates:
    """The cached states of Serve's applications and the GPU waits by ModelDeployment."""

    def __init__(self) -> None:
        self._states: dict[str, str] = {}
        self.replicas: dict[str, frozenset[str]] = {}  # app → its RUNNING replicas' ids (not autoscaled apps)
        self.gpu_waits: dict[str, GpuWait] = {}  # ModelDeployment (namespace/name) → its replica's GPU wait
        self._states_at = 0.0
        self._refresher: asyncio.Task[None] | None = None

    async def now(self, app_name: str) -> str:
        """The cached state of an app; one that is not RUNNING is looked at again before refusing."""
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.create_task(self._refresh_forever())
        state = self._states.get(app_name)
        if state != "RUNNING" and time.monotonic() - self._states_at > STATE_RECHECK_S:
            await self._refresh()
            state = self._states.get(app_name)
        return state or "NOT_STARTED"

    async def status_state(self, app_name: str | None, info: dict[str, Any] | None) -> str:
        """The `application_state` of `/status`: from the replica's info when it answered, else Serve's."""
        if app_name is None:
            return "NOT_STARTED"  # COLD: no application by design
        if info is not None:
            return "UNHEALTHY" if info.get("wedged") else "RUNNING"
        state = await self.now(app_name)
        return state if state in ("RUNNING", "DEPLOYING", "NOT_STARTED") else "UNHEALTHY"

    async def _refresh(self) -> None:
        """Serve's application states in one controller call: RUNNING when some replica runs."""
        try:
            details = await asyncio.to_thread(serve_details)
            states, replicas = app_states(details), channel_replicas(details)
        except Exception as exc:
            log.info("reading Serve's application states failed: %s", exc)
            return
        if any(state != "RUNNING" for state in states.values()) or self.gpu_waits:
            self.gpu_waits = await self._read_gpu_waits()
        self._states, self.replicas, self._states_at = states, replicas, time.monotonic()

    async def _read_gpu_waits(self) -> dict[str, GpuWait]:
        """The HOT replicas waiting for a GPU share another replica holds (model_runtime/gpu_waits.py)."""
        from ray.util.placement_group import placement_group_table

        try:
            return gpu_waits(await asyncio.to_thread(placement_group_table))
        except Exception as exc:
            log.info("placement_group_table failed: %s", exc)
            return self.gpu_waits

    async def _refresh_forever(self) -> None:
        while True:
            await self._refresh()
            await asyncio.sleep(STATE_REFRESH_S)

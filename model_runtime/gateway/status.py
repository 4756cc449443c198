"""The gateway's `GET /status` answer: every routed model, its level, its app's state and the demand.

Each served model's replica is asked for its info (level, queue depth, start-up phases), all at
once; an app that does not answer is reported COLD with Serve's state of it, and, while it is not
RUNNING, its replica's wait for a GPU share. The operator and the client both read this.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from model_runtime.gateway.app_states import AppStates
from model_runtime.gateway.demand import Demand
from model_runtime.gateway.routing import Routing
from model_runtime.model_keys import client_model_key
from ndif_operator.api.naming import model_app_name

log = logging.getLogger("ray.serve")

INFO_TIMEOUT_S = 10.0
_COLD = "Cold"


async def _model_info(routing: Routing, app_name: str) -> dict[str, Any] | None:
    """The model replica's info, or None when its app is not running (COLD / not deployed)."""
    try:
        handle = routing.handle(app_name)
        info: dict[str, Any] = await asyncio.wait_for(handle.info.remote(), INFO_TIMEOUT_S)
        return info
    except Exception as exc:
        routing.forget(app_name)
        log.info("model app %s unavailable: %s", app_name, exc)
        return None


async def status_answer(routing: Routing, states: AppStates, demand: Demand) -> dict[str, Any]:
    deployments: dict[str, Any] = {}
    routes = sorted(routing.routes.items())
    infos = await asyncio.gather(*(_model_info(routing, r.app) for _, r in routes if r.app is not None))
    served = iter(infos)
    for key, route in routes:
        info = next(served) if route.app is not None else None
        known = info or {}  # an app that is not running tells nothing: report it COLD
        repo_id = str(known.get("repo_id") or route.repo_id or key)
        revision = str(known.get("revision", route.revision))
        trust = bool(known.get("trust_remote_code"))
        name = route.app or (model_app_name(*route.deployment.split("/", 1)) if "/" in route.deployment
                             else key)
        deployments[name] = {
            "model_key": client_model_key(repo_id, revision, trust),
            "repo_id": repo_id,
            "task": "text-generation",
            "trust_remote_code": trust,
            "revision": revision,
            "deployment_level": str(known.get("level", _COLD)).upper(),
            "application_state": (state := await states.status_state(route.app, info)),
            "queue_depth": known.get("queue_depth", 0),
            "activation_requested": key in demand.requested,
            "activation_requested_at": demand.requested.get(key),  # epoch seconds or None
            "deployment": route.deployment or str(known.get("deployment", "")),  # namespace/name
            "granted_level": str(route.level).upper(),
            "load_source": known.get("source"),  # nodeMemory: weights mapped from the node's store
            "replica_startup": known.get("startup"),  # epoch seconds of the replica's start-up phases
            "transitions": known.get("transitions"),
            # Its replica's wait for a GPU share (the table is read every few seconds: a
            # running app's wait is over).
            "gpu_wait": wait.as_json(time.time()) if state != "RUNNING" and (
                wait := states.gpu_waits.get(route.deployment)) else None,
        }
    return {"deployments": deployments}

"""Kopf wiring: the handlers only wake the single planner loop (see reconciler.py).

Built per run into a fresh `kopf.OperatorRegistry` (no module-level decorators), so tests can
start, stop and restart operators in one process. No kopf-tracked create/update/delete handlers
exist, so kopf writes no progress or diff-base annotations and adds no finalizer of its own: the
operator's finalizer (settings.finalizer) is managed by the reconciler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import kopf

from ndif_operator.api import GROUP, PLURAL, VERSION
from ndif_operator.operator import health, metrics
from ndif_operator.operator.kube import RAY_GROUP, RAY_PLURAL, RAY_VERSION, KubeApi
from ndif_operator.operator.reconciler import Estimator, Reconciler
from ndif_operator.operator.settings import OperatorSettings

logger = logging.getLogger("ndif_operator.handlers")


_health_ports: set[int] = set()  # one probe server per process (tests restart operators in one process)


@dataclass
class _State:
    reconciler: Reconciler | None = None
    task: asyncio.Task[None] | None = None
    heartbeat: asyncio.Task[None] | None = None
    api: KubeApi | None = None


def build_registry(settings: OperatorSettings, *, estimator: Estimator | None = None) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    state = _State()

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.level = logging.WARNING  # our own Events carry the story; kopf's are noise
        settings.watching.server_timeout = 300
        settings.networking.error_backoffs = [0.5, 1, 2, 5, 10, 30]
        # One-time discovery instead of watching CRDs and namespaces: narrower RBAC (as poolboy does).
        settings.scanning.disabled = True
        state.api = await KubeApi.connect(ndif_settings.kube_api_url)
        state.reconciler = Reconciler(state.api, ndif_settings, estimator=estimator)
        state.task = asyncio.create_task(state.reconciler.run(), name="ndif-planner")
        state.reconciler.wake()  # the first pass after start: restart-safe, changes nothing if all is done
        metrics.serve(ndif_settings.metrics_port)
        health.STATE.failing_seconds = ndif_settings.unready_after_failing_seconds
        state.heartbeat = asyncio.create_task(health.heartbeat(), name="ndif-heartbeat")
        if ndif_settings.health_port and ndif_settings.health_port not in _health_ports:
            health.serve(ndif_settings.health_port)
            _health_ports.add(ndif_settings.health_port)

    ndif_settings = settings

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        for task in (state.task, state.heartbeat):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if state.api is not None:
            await state.api.close()

    def wake() -> None:
        if state.reconciler is not None:
            state.reconciler.wake()

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    def model_deployment_changed(**_: Any) -> None:
        wake()

    @kopf.on.event(RAY_GROUP, RAY_VERSION, RAY_PLURAL, registry=registry)
    def ray_service_changed(**_: Any) -> None:
        wake()  # app statuses, upgrades and foreign edits of serveConfigV2 all matter

    @kopf.on.probe(id="plannerPasses", registry=registry)
    def planner_passes(**_: Any) -> int:
        return state.reconciler.passes if state.reconciler is not None else 0

    if settings.kube_api_url:
        url = settings.kube_api_url

        @kopf.on.login(registry=registry)
        def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=url, insecure=True)

    return registry


def run_operator(settings: OperatorSettings, *, stop_flag: Any = None, ready_flag: Any = None,
                 estimator: Estimator | None = None, liveness_endpoint: str | None = None) -> None:
    """Run until `stop_flag` is set (or a signal, when in the main thread)."""
    namespaces = settings.namespace_list
    asyncio.run(kopf.operator(
        registry=build_registry(settings, estimator=estimator),
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=True,  # one replica (Recreate); kopf has no lease-based election
        stop_flag=stop_flag,
        ready_flag=ready_flag,
        liveness_endpoint=liveness_endpoint,
    ))

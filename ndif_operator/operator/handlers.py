"""Kopf wiring: the handlers only wake the single planner loop (see loop.py and reconciler.py).

Built per run into a fresh `kopf.OperatorRegistry` (no module-level decorators), so tests can
start, stop and restart operators in one process. No kopf-tracked create/update/delete handlers
exist, so kopf writes no progress or diff-base annotations and adds no finalizer of its own: the
operator's finalizer (settings.finalizer) is managed by the reconciler. The handlers are
`async def`: Kopf runs them on the event loop, where the planner's wake-up Event lives (a sync
handler would run in a worker thread, and setting an asyncio Event from there is not safe).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf

from ndif_operator.api import GROUP, PLURAL, VERSION
from ndif_operator.operator import health, metrics
from ndif_operator.operator.kube import RAY_VERSION, KubeApi, KubeError
from ndif_operator.operator.login import Login, LoginError, describe_failure
from ndif_operator.operator.rbac import RAY_GROUP, RAY_PLURAL
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


def build_registry(settings: OperatorSettings, login: Login, *, estimator: Estimator | None = None,
                   on_login_failure: Callable[[], None] = lambda: None) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    state = _State()

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.level = logging.WARNING  # our own Events carry the story; kopf's are noise
        settings.watching.server_timeout = 300
        settings.networking.error_backoffs = [0.5, 1, 2, 5, 10, 30]
        # One-time discovery instead of watching CRDs and namespaces: narrower RBAC (as poolboy does).
        settings.scanning.disabled = True
        state.api = KubeApi.connect(login)
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
    async def model_deployment_changed(**_: Any) -> None:
        wake()

    @kopf.on.event(RAY_GROUP, RAY_VERSION, RAY_PLURAL, registry=registry)
    async def ray_service_changed(**_: Any) -> None:
        wake()  # app statuses, upgrades, re-creation and foreign edits of serveConfigV2 all matter

    @kopf.on.probe(id="plannerPasses", registry=registry)
    async def planner_passes(**_: Any) -> int:
        return state.reconciler.passes if state.reconciler is not None else 0

    @kopf.on.login(registry=registry, errors=kopf.ErrorsMode.PERMANENT)
    async def log_in(**_: Any) -> kopf.ConnectionInfo:
        # Kopf logs in again after a 401: resolve afresh (rotated token files, renewed exec credentials)
        # and prove them with one request, so that revoked credentials stop the operator with one
        # line instead of leaving Kopf's watches failing forever.
        try:
            await check_login(login, settings.namespace_list)
        except LoginError as exc:
            login.last_error = exc
            on_login_failure()  # run_operator stops and reports it as it is
            raise kopf.PermanentError(str(exc)) from exc
        credentials = login.current()
        return kopf.ConnectionInfo(
            server=credentials.server, ca_path=credentials.ca_path, insecure=credentials.insecure,
            scheme="Bearer" if credentials.token else None, token=credentials.token,
            certificate_path=credentials.certificate_path, private_key_path=credentials.private_key_path,
            default_namespace=credentials.namespace, expiration=credentials.expires)

    return registry


def run_operator(settings: OperatorSettings, *, stop_flag: Any = None, ready_flag: Any = None,
                 estimator: Estimator | None = None, liveness_endpoint: str | None = None,
                 login: Login | None = None) -> None:
    """Run until `stop_flag` is set (or a signal, when in the main thread).

    Raises `LoginError` (one line: what to fix) when there are no usable credentials, the API
    server refuses them, or the CRD is missing: retrying would not help."""
    asyncio.run(_operate(settings, login or Login(settings), stop_flag=stop_flag, ready_flag=ready_flag,
                         estimator=estimator, liveness_endpoint=liveness_endpoint))


async def _operate(settings: OperatorSettings, login: Login, *, stop_flag: Any, ready_flag: Any,
                   estimator: Estimator | None, liveness_endpoint: str | None) -> None:
    await check_login(login, settings.namespace_list)
    namespaces = settings.namespace_list
    # Kopf only logs a failed re-login and keeps its watches failing: stop on our own flag instead,
    # set by the caller's flag or by the login handler when the credentials are refused.
    stop = asyncio.Event()
    registry = build_registry(settings, login, estimator=estimator, on_login_failure=stop.set)
    follower = asyncio.create_task(_follow(stop_flag, stop)) if stop_flag is not None else None
    try:
        await kopf.operator(
            registry=registry,
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=True,  # one replica (Recreate); kopf has no lease-based election
            stop_flag=stop,
            ready_flag=ready_flag,
            liveness_endpoint=liveness_endpoint,
        )
    except Exception as exc:
        # Kopf re-raises a failed re-login (its ActivityError) or credentials it ran out of (LoginError).
        if login.last_error is not None:
            raise LoginError(f"logging in again failed: {login.last_error}") from exc
        if isinstance(exc, kopf.LoginError):
            raise LoginError(f"the API server stopped accepting the credentials ({exc})") from exc
        raise
    finally:
        if follower is not None:
            follower.cancel()
    if login.last_error is not None:
        raise LoginError(f"logging in again failed: {login.last_error}")


async def _follow(flag: Any, stop: asyncio.Event) -> None:
    """Set `stop` once the caller's stop flag (threading.Event, asyncio.Event or Future) is set."""
    while not (flag.done() if isinstance(flag, asyncio.Future) else flag.is_set()):
        await asyncio.sleep(0.1)
    stop.set()


async def check_login(login: Login, namespaces: list[str], *, attempts: int = 6) -> None:
    """Resolve the credentials and make the first request before Kopf starts, so that a login
    problem is one clear error. An unreachable server is retried for about half a minute."""
    credentials = await asyncio.to_thread(login.resolve)
    api = KubeApi.connect(login)
    try:
        for attempt in range(attempts):
            try:
                await api.list_model_deployments(namespaces[:1])
                logger.info("logged in to %s with %s", credentials.server, credentials.source)
                return
            except KubeError as exc:  # status 0: no HTTP answer
                status: int | None = exc.status or None
                detail = str(exc)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                status, detail = None, str(exc) or type(exc).__name__
            untrusted = "CERTIFICATE_VERIFY_FAILED" in detail or "certificate verify failed" in detail
            if (status is not None and status < 500) or untrusted or attempt == attempts - 1:
                raise LoginError(describe_failure(credentials, status, detail))
            logger.warning("API server %s not ready (%s); retrying", credentials.server, detail)
            await asyncio.sleep(min(2 ** attempt, 10))
    finally:
        await api.close()

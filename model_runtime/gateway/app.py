"""The gateway application: the nnsight 0.8.1 ingress (`NnsightGateway`, route prefix `/`).

Speaks the unmodified client's protocol:

* `WS /subscribe`: first frame `{"session_id": ...}`; then one frame per status of that session's
  jobs: JSON text, or a binary `ResponseModel.pickle()` for an inline COMPLETED result.
* `POST /request`: multipart `data` (the envelope JSON) + `blob`; answers `ResponseModel` RECEIVED
  with a server-minted job id, then QUEUED → RUNNING → LOG… → COMPLETED | ERROR follow on the
  websocket (blocking) or as the latest status at `GET /response/{id}` (non-blocking; 404 until
  the first status).
* `GET /result/{token}`: a result kept by the gateway when no object store is configured.
* `GET /status` (models with HOT/WARM/COLD and app state), `GET /env`, `GET /ping`.

Routing: a client key's `repo_id` (lower-cased) → the routing table (`GatewayUserConfig`, the
deployment's `user_config`, replaced in place by `reconfigure`: adding or removing a model never
restarts the gateway and its in-memory sessions and jobs) → the model app's DeploymentHandle.
Unknown → 404; COLD (routed, no app) → 503 "COLD"; an app without a running replica → 503 with its
Serve state (from a status cache refreshed in the background). A served model is asked nothing
before the request: its `execute` stream's first event is the admission answer (QUEUED, or a
refusal such as WARM / full queue / revision, which becomes the HTTP error); a WARM model whose
policy is `activateOnRequest` has the demand recorded in `/status` for the operator.

The gateway imports neither torch nor nnsight: the model app builds inline result frames.
Job and session state live in this replica's memory, so the gateway runs as one replica.
"""

# No `from __future__ import annotations`: FastAPI must see real classes in the endpoint signatures
# that Serve rewrites (string annotations turn `websocket: WebSocket` into a query parameter).

import asyncio
import collections
import contextlib
import json
import logging
import sys
import threading
import time
from importlib import metadata
from typing import Any

import ray
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response
from ray import serve

from model_runtime import handoff, weight_store
from model_runtime.gateway.auth import ApiKeys
from model_runtime.gateway.bounds import HttpError, bounded_event, read_body_capped
from model_runtime.gateway.door import Door
from model_runtime.gateway.jobs import Job, JobStore, JobStoreFull
from model_runtime.gateway.lean import LeanIngress
from model_runtime.gateway.results import MemoryResults, result_store
from model_runtime.gpu_waits import GpuWait, gpu_waits
from model_runtime.metrics import gateway_metrics
from model_runtime.model_keys import client_model_key, repo_key
from model_runtime.settings import RuntimeSettings
from model_runtime.versions import version_refusal
from ndif_operator import logs
from ndif_operator.api import GatewayAppArgs, GatewayRoute, GatewayUserConfig, Level
from ndif_operator.api.naming import API_KEY_HEADER, GATEWAY_DEPLOYMENT, model_app_name

log = logging.getLogger("ray.serve")

_INFO_TIMEOUT_S = 10.0
# The model's first event (its admission answer) comes at once unless Serve has no replica to route to.
_ADMISSION_TIMEOUT_S = 30.0
_STATE_REFRESH_S = 2.0  # background refresh of the Serve application states
_STATE_RECHECK_S = 0.25  # an app not RUNNING in the cache is looked at again at most this often
_COLD = "Cold"
# A job first in its model's queue starts at once: its QUEUED frame goes to the client only if the job
# is still queued this long after admission (one websocket frame through the proxy fewer per small
# request). A job behind others hears its position at once.
_QUIET_QUEUED_S = 0.05

app = FastAPI(title="NDIF gateway", docs_url=None, redoc_url=None)


def _response(job_id: str, status: str, description: str = "", data: Any = None,
              meta: dict[str, Any] | None = None) -> dict[str, Any]:
    # The JSON form of nnsight's ResponseModel (the client validates it with pydantic).
    return {"id": job_id, "status": status, "description": description, "data": data, "meta": meta}


# Module helpers the gateway class uses sit above it: `serve.ingress` pickles the class by value,
# with the globals that exist at that point.
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


async def _send_frame(websocket: WebSocket, frame: str | bytes) -> None:
    if isinstance(frame, bytes):
        await websocket.send_bytes(frame)
    else:
        await websocket.send_text(frame)


@app.exception_handler(HttpError)
async def _http_error(request: Request, exc: HttpError) -> JSONResponse:
    if request.url.path.endswith("/request"):
        # Tagged with a model only once it is known to be deployed (request.state.model, set by the endpoint).
        gateway_metrics().refusal(getattr(request.state, "model", "unknown"), exc.status)
    # `{"detail": ...}` is what the nnsight client shows in its RemoteError.
    return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)


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


def serve_details() -> dict[str, Any]:
    """Serve's instance details as its controller sends them: a dict in the shape of Serve's REST
    API (`GET /api/serve/applications/`). `serve.status()` reads the same and then builds pydantic
    models of it, which pickles every deployment's request-router class: about 11 ms more of this
    process's CPU, holding its GIL, per read on a 2-core x86_64 box (every 2 s)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return dict(client.get_serve_details()) if client is not None else {}


@serve.deployment(name=GATEWAY_DEPLOYMENT, num_replicas=1, max_ongoing_requests=1000)
@serve.ingress(app)
class NnsightGateway:
    def __init__(self, args: dict[str, Any]) -> None:
        logs.setup_runtime()
        self.args = GatewayAppArgs.model_validate(args)
        # Deprecated static routes from args; the user_config table (reconfigure) replaces them.
        self._static = {repo_key(k): GatewayRoute(deployment="", level=Level.HOT, app=v, repo_id=k)
                        for k, v in self.args.models.items()}
        self.routes: dict[str, GatewayRoute] = dict(self._static)
        self._app_states: dict[str, str] = {}
        self._gpu_waits: dict[str, GpuWait] = {}  # ModelDeployment (namespace/name) → its replica's GPU wait
        self._states_at = 0.0
        self._refresher: asyncio.Task[None] | None = None
        self._payload_limits: dict[str, int] = {}  # app → max_payload_bytes, learned from admissions
        self.keys = ApiKeys.from_env(self.args.api_key_hashes_env, self.args.api_key_hashes_dir)
        self.jobs = JobStore()
        self.results = result_store(self.args.object_store_bucket, self.args.object_store_endpoint_url)
        self._handles: dict[str, Any] = {}
        # (app, by value) → (its handle, that handle with `execute`'s options, the chunk size): built once.
        self._executes: dict[tuple[str, bool], tuple[Any, Any, int]] = {}
        self._inflight: dict[str, int] = {}  # app → this gateway's jobs admitted and not finished
        self._tasks: set[asyncio.Task[None]] = set()
        self.activation_requests: dict[str, float] = {}
        self._recent: collections.deque[tuple[str, str, dict[str, float]]] = collections.deque(maxlen=256)
        self._demand_seq = 0  # bumped per recorded demand; `GET /demand` long-polls on it
        self._demand_waiters: set[asyncio.Future[None]] = set()
        self._keepalive_s = RuntimeSettings.from_env().ws_keepalive_s
        self._loop = asyncio.get_running_loop()  # Serve builds an ingress replica on its user-code loop
        self._door: Door | None = None

    def reconfigure(self, user_config: dict[str, Any] | None, rank: Any = None) -> None:
        """A new routing table, in place: sessions, jobs and open websockets are kept.

        Taking `rank` makes Serve call this once at start-up even without a user_config: the door
        opens here, after the first routing table, so a new replica never answers before it routes."""
        if user_config is not None:
            self._route(GatewayUserConfig.model_validate(user_config))
        self._open_door()

    def _open_door(self) -> None:
        if self._door is not None or self.args.direct_port is None:
            return
        # `app` (set by serve.ingress) is the ASGI app Serve itself serves, its routes bound to this
        # replica; the door serves it with the blocking client's two routes taken straight to this object.
        self._door = Door(LeanIngress(getattr(self, "app"), self),  # noqa: B009
                          self.args.direct_host, self.args.direct_port,
                          owner=serve.get_replica_context().replica_tag,
                          node_id=ray.get_runtime_context().get_node_id(),
                          loop=self._loop, busy=lambda: bool(self._tasks), succeeded=self._succeeded)
        self._door.open()

    async def _succeeded(self) -> bool:
        """Whether Serve replaces this replica (a rolling update, a restart) rather than deleting its app."""
        app_name = serve.get_replica_context().app_name
        try:
            apps = (await asyncio.wait_for(asyncio.to_thread(serve.status), 2.0)).applications
        except Exception:
            return True  # unknown: wait for a successor (bounded)
        status = apps[app_name].status if app_name in apps else "DELETING"
        return str(getattr(status, "value", status)) != "DELETING"  # ApplicationStatus is a str enum

    async def __del__(self) -> None:
        # Serve awaits this at the end of the replica's graceful shutdown (its drain counts only
        # requests that came through the proxy): the door's unfinished jobs get their own drain.
        if self._door is not None:
            await self._door.close()

    def _route(self, table: GatewayUserConfig) -> None:
        served_before = _served(self.routes)
        self.routes = {**self._static, **{repo_key(k): route for k, route in table.models.items()}}
        # Models that went COLD (or left the table) free their host copies in the nodes' weight stores.
        cold = (served_before - _served(self.routes)) | (set(self.routes) - _served(self.routes))
        if cold:
            threading.Thread(target=_evict_host_copies, args=(sorted(cold),), daemon=True).start()
        apps = {a for route in self.routes.values() for a in (route.apps or ([route.app] if route.app else []))}
        for app_name in [a for a in self._handles if a not in apps]:
            self._handles.pop(app_name, None)
            self._payload_limits.pop(app_name, None)
        log.info("gateway routes: %s", {k: (r.app, r.level) for k, r in sorted(self.routes.items())})

    # --- helpers ----------------------------------------------------------------------------

    def _auth(self, key: str | None) -> str:
        owner = self.keys.check(key)
        if owner is None:
            raise HttpError(401, "Missing or invalid API key (header ndif-api-key).")
        return owner

    def _handle(self, app_name: str) -> Any:
        handle = self._handles.get(app_name)
        if handle is None:
            # Its router stays on Serve's router thread: a router on this loop did not route a call
            # made while the app had no replica once one came up (the call timed out instead;
            # tests/runtime/test_gpu_lease.py shows it through /status).
            handle = serve.get_app_handle(app_name)
            self._handles[app_name] = handle
        return handle

    async def _refresh_states(self) -> None:
        """Serve's application states in one controller call: RUNNING when some replica runs."""
        try:
            states = app_states(await asyncio.to_thread(serve_details))
        except Exception as exc:
            log.info("reading Serve's application states failed: %s", exc)
            return
        if any(state != "RUNNING" for state in states.values()) or self._gpu_waits:
            self._gpu_waits = await self._read_gpu_waits()
        self._app_states, self._states_at = states, time.monotonic()

    async def _read_gpu_waits(self) -> dict[str, GpuWait]:
        """The HOT replicas waiting for a GPU share another replica holds (model_runtime/gpu_waits.py)."""
        from ray.util.placement_group import placement_group_table

        try:
            return gpu_waits(await asyncio.to_thread(placement_group_table))
        except Exception as exc:
            log.info("placement_group_table failed: %s", exc)
            return self._gpu_waits

    async def _refresh_forever(self) -> None:
        while True:
            await self._refresh_states()
            await asyncio.sleep(_STATE_REFRESH_S)

    async def _app_state_now(self, app_name: str) -> str:
        """The cached state of an app; one that is not RUNNING is looked at again before refusing."""
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.create_task(self._refresh_forever())
        state = self._app_states.get(app_name)
        if state != "RUNNING" and time.monotonic() - self._states_at > _STATE_RECHECK_S:
            await self._refresh_states()
            state = self._app_states.get(app_name)
        return state or "NOT_STARTED"

    async def _model_info(self, app_name: str) -> dict[str, Any] | None:
        """The model replica's info, or None when its app is not running (COLD / not deployed)."""
        try:
            handle = self._handle(app_name)
            info: dict[str, Any] = await asyncio.wait_for(handle.info.remote(), _INFO_TIMEOUT_S)
            return info
        except Exception as exc:
            self._handles.pop(app_name, None)
            log.info("model app %s unavailable: %s", app_name, exc)
            return None

    # --- endpoints ----------------------------------------------------------------------------

    @app.get("/ping")
    async def ping(self, request: Request) -> Response:
        self._auth(request.headers.get(API_KEY_HEADER))
        return Response("pong", media_type="text/plain")

    @app.get("/env")
    async def env(self, request: Request) -> dict[str, Any]:
        self._auth(request.headers.get(API_KEY_HEADER))
        packages = {d.metadata["Name"]: d.version for d in metadata.distributions() if d.metadata["Name"]}
        return {"python_version": sys.version, "packages": packages}

    @app.get("/status")
    async def status(self, request: Request) -> dict[str, Any]:
        self._auth(request.headers.get(API_KEY_HEADER))
        deployments: dict[str, Any] = {}
        routes = sorted(self.routes.items())
        infos = await asyncio.gather(*(self._model_info(r.app) for _, r in routes if r.app is not None))
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
                "application_state": (state := await self._status_state(route.app, info)),
                "queue_depth": known.get("queue_depth", 0),
                "activation_requested": key in self.activation_requests,
                "activation_requested_at": self.activation_requests.get(key),  # epoch seconds or None
                "deployment": route.deployment or str(known.get("deployment", "")),  # namespace/name
                "granted_level": str(route.level).upper(),
                "load_source": known.get("source"),  # nodeMemory: weights mapped from the node's store
                "replica_startup": known.get("startup"),  # epoch seconds of the replica's start-up phases
                "transitions": known.get("transitions"),
                # Its replica's wait for a GPU share (the table is read every few seconds: a
                # running app's wait is over).
                "gpu_wait": wait.as_json(time.time()) if state != "RUNNING" and (
                    wait := self._gpu_waits.get(route.deployment)) else None,
            }
        return {"deployments": deployments}

    async def _status_state(self, app_name: str | None, info: dict[str, Any] | None) -> str:
        if app_name is None:
            return "NOT_STARTED"  # COLD: no application by design
        if info is not None:
            return "UNHEALTHY" if info.get("wedged") else "RUNNING"
        state = await self._app_state_now(app_name)
        return state if state in ("RUNNING", "DEPLOYING", "NOT_STARTED") else "UNHEALTHY"

    @app.websocket("/subscribe")
    async def subscribe(self, websocket: WebSocket) -> None:
        if self.keys.check(websocket.headers.get(API_KEY_HEADER)) is None:
            await websocket.close(code=1008, reason="Missing or invalid API key")
            return
        await websocket.accept()
        session_id, queue = self.jobs.open_session()
        await websocket.send_text(json.dumps({"session_id": session_id}))
        self.jobs.attach(session_id, lambda frame: _send_frame(websocket, frame))
        # Watch for the client going away while we wait for frames to send.
        receiver: asyncio.Task[Any] = asyncio.create_task(websocket.receive())
        getter: asyncio.Task[Any] | None = None
        try:
            while True:
                if getter is None:
                    getter = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait(
                    {getter, receiver}, timeout=self._keepalive_s, return_when=asyncio.FIRST_COMPLETED
                )
                if getter in done:
                    frame, getter = getter.result(), None
                    await _send_frame(websocket, frame)
                    self.jobs.sent(session_id)
                if receiver in done:
                    if receiver.result().get("type") == "websocket.disconnect":
                        break
                    receiver = asyncio.create_task(websocket.receive())  # ignore client chatter
                if not done:
                    await self._keepalive(websocket, session_id)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            receiver.cancel()
            if getter is not None:
                getter.cancel()
            self.jobs.close_session(session_id)

    async def _keepalive(self, websocket: WebSocket, session_id: str) -> None:
        """Idle session with a job in flight: repeat its status so proxies and load balancers keep
        the connection (the client sends no pings of its own and has no receive timeout)."""
        now = time.monotonic()
        for job in self.jobs.active(session_id):
            if job.latest is not None and job.latest["status"] in ("QUEUED", "RUNNING"):
                waited = f"{job.latest['description']} ({now - job.created:.0f} s)"
                await websocket.send_text(json.dumps({**job.latest, "description": waited}))

    @app.post("/request")
    async def request(self, request: Request) -> dict[str, Any]:
        arrived = time.time()
        owner = self._auth(request.headers.get(API_KEY_HEADER))
        refusal = version_refusal(request.headers.get("nnsight-version"), self.args.min_nnsight_version)
        if refusal:
            raise HttpError(400, refusal)
        await read_body_capped(request, self.args.max_request_bytes)
        body_read = time.time()
        data, blob = await self._multipart(request)
        form_parsed = time.time()
        try:
            envelope = json.loads(data)
            if not isinstance(envelope, dict):
                raise ValueError("not a JSON object")
            key = repo_key(str(envelope["model_key"]))
        except (ValueError, KeyError) as exc:
            raise HttpError(400, f"Invalid request envelope: {exc}") from None
        route = self.routes.get(key)
        if route is None:
            known = ", ".join(sorted(self.routes)) or "none"
            raise HttpError(404, f"Model {key!r} is not deployed here (models: {known}).")
        request.state.model = key
        if route.app is None or route.level == Level.COLD:
            raise HttpError(503, f"Model {key!r} is COLD (on disk only, not loaded); ask an admin to make it "
                                 "Hot or Warm.")
        app_name = await self._pick_app(route.apps or [route.app])
        state = await self._app_state_now(app_name)
        wait = self._gpu_waits.get(route.deployment) if route.deployment else None
        if state == "DEPLOYING" and wait is not None:
            left = max(1, round(wait.since + wait.timeout_s - time.time()))
            raise HttpError(503, f"Model {key!r} is not serving yet: its replica is {wait.describe(time.time())}; "
                                 "retry later.", {"Retry-After": str(min(left, 30))})
        if state == "DEPLOYING":
            raise HttpError(503, f"Model {key!r} is being deployed (loading); retry shortly.")
        if state != "RUNNING":
            raise HttpError(503, f"Model {key!r} is not running ({state}); ask an admin to make it Hot.")
        limit = self._payload_limits.get(app_name)
        if limit is not None and len(blob) > limit:  # spare the replica an oversize body
            raise HttpError(413, f"Payload of {len(blob)} bytes exceeds this model's limit of {limit} bytes.")
        session_id = str(envelope.get("session_id") or "")
        if session_id and not self.jobs.has_session(session_id):
            raise HttpError(400, "Unknown session id: open /subscribe first.")
        envelope["session_id"] = session_id
        try:
            job = self.jobs.new_job(key, owner, session_id)
        except JobStoreFull as exc:
            raise HttpError(503, str(exc)) from None
        job.timings.update(received=arrived, body=body_read, form=form_parsed, parsed=time.time())
        inline_max = self.args.inline_result_max_bytes if session_id else 0
        stream = self._admit(app_name, job, envelope, blob, inline_max)
        self._inflight[app_name] = self._inflight.get(app_name, 0) + 1
        try:
            first = await self._first_event(key, app_name, job, stream)
        except BaseException:
            self._done(app_name)
            raise
        job.timings["admitted"] = time.time()
        received = _response(job.id, "RECEIVED", "Your job has been received and is waiting approval.")
        self._record(job, received, push=False)
        gateway_metrics().admitted(key)
        task = asyncio.create_task(self._process(job, stream, first, str(request.base_url)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: self._done(app_name))
        return received

    async def _pick_app(self, apps: list[str]) -> str:
        """The application (one per pinned replica slot) with the fewest of this gateway's jobs in
        flight, among those Serve can route to; ties go to the lowest slot. An idle slot scaled to
        zero is picked once the running ones are busy, which is what makes Serve scale it up."""
        if len(apps) == 1:
            return apps[0]
        states = {app: await self._app_state_now(app) for app in apps}
        routable = [app for app in apps if states[app] in ("RUNNING", "DEPLOYING")] or apps
        return min(routable, key=lambda app: (self._inflight.get(app, 0), states[app] != "RUNNING",
                                              apps.index(app)))

    def _done(self, app_name: str) -> None:
        left = self._inflight.get(app_name, 0) - 1
        if left > 0:
            self._inflight[app_name] = left
        else:
            self._inflight.pop(app_name, None)

    def _admit(self, app_name: str, job: Job, envelope: dict[str, Any], blob: bytes, inline_max: int) -> Any:
        try:
            base, by_value = self._handle(app_name), len(blob) <= handoff.BY_VALUE_MAX_BYTES
            cached = self._executes.get((app_name, by_value))
            if cached is None or cached[0] is not base:
                options, chunk_bytes = handoff.call_options(len(blob))  # small ones by value, over gRPC
                cached = (base, base.options(method_name="execute", stream=True, **options), chunk_bytes)
                self._executes[(app_name, by_value)] = cached
            _, handle, chunk_bytes = cached
            return handle.remote(job.id, envelope, blob, inline_max, chunk_bytes)
        except Exception as exc:  # the app vanished between the state check and now
            self.jobs.discard(job.id)
            self._handles.pop(app_name, None)
            raise HttpError(503, f"Model {job.model_key!r} is not running ({exc}); retry shortly.") from None

    async def _first_event(self, key: str, app_name: str, job: Job, stream: Any) -> dict[str, Any]:
        """The model's admission answer: QUEUED, or a refusal that becomes this request's HTTP error."""
        try:
            async with asyncio.timeout(_ADMISSION_TIMEOUT_S):  # no task of its own, unlike wait_for
                first: dict[str, Any] = await stream.__anext__()
        except Exception as exc:  # timeout, a stream that ended at once, or a dead app
            self.jobs.discard(job.id)
            with contextlib.suppress(Exception):
                stream.cancel()
            self._handles.pop(app_name, None)
            log.info("model app %s did not admit job %s: %r", app_name, job.id, exc)
            raise HttpError(503, f"Model {key!r} did not answer ({type(exc).__name__}); retry shortly.") from None
        limits = first.get("limits") or {}
        if "max_payload_bytes" in limits:
            self._payload_limits[app_name] = int(limits["max_payload_bytes"])
        if first.get("status") == "QUEUED":
            return first
        self.jobs.discard(job.id)
        gateway_metrics().replica_report(key, first.get("report"))  # InfluxDB: a full queue's refusal
        if first.get("activation_requested"):
            self._note_demand(key)
        retry = first.get("retry_after_s")
        headers = {"Retry-After": str(max(1, round(float(retry))))} if retry is not None else None
        raise HttpError(int(first.get("http_status", 503)), str(first.get("description", "Refused.")), headers)

    def _note_demand(self, key: str) -> None:
        """Record a WARM model's activation request and wake the `GET /demand` long-polls at once."""
        self.activation_requests[key] = time.time()
        self._demand_seq += 1
        for waiter in self._demand_waiters:
            if not waiter.done():
                waiter.set_result(None)

    @app.get("/demand")
    async def demand(self, request: Request, since: int = -1, timeout: float = 30.0) -> dict[str, Any]:
        """Activation demand, pushed: answers as soon as a demand newer than `since` is recorded
        (or after `timeout` seconds, at most 60). The operator and local mode watch this instead of
        polling `/status`; the body has `/status`'s shape for the requested models, plus `seq`."""
        self._auth(request.headers.get(API_KEY_HEADER))
        if self._demand_seq <= since:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._demand_waiters.add(waiter)
            try:
                await asyncio.wait_for(waiter, min(max(timeout, 0.0), 60.0))
            except TimeoutError:
                pass
            finally:
                self._demand_waiters.discard(waiter)
        deployments = {
            key: {"deployment": route.deployment, "activation_requested": True,
                  "activation_requested_at": self.activation_requests[key], "granted_level": str(route.level).upper()}
            for key, route in sorted(self.routes.items()) if key in self.activation_requests
        }
        return {"seq": self._demand_seq, "deployments": deployments}

    @staticmethod
    async def _multipart(request: Request) -> tuple[str, bytes]:
        try:
            form = await request.form(max_files=1, max_fields=1)
        except Exception as exc:
            raise HttpError(400, f"Expected multipart/form-data with `data` and `blob`: {exc}") from None
        data, blob = form.get("data"), form.get("blob")
        if not isinstance(data, str) or blob is None or isinstance(blob, str):
            raise HttpError(400, "Expected multipart/form-data with a `data` field and a `blob` file.")
        return data, await blob.read()

    @app.get("/response/{job_id}")
    async def response(self, job_id: str, request: Request) -> dict[str, Any]:
        owner = self._auth(request.headers.get(API_KEY_HEADER))
        job = self.jobs.get(job_id)
        if job is None or job.latest is None or (self.keys.enabled and job.owner != owner):
            raise HttpError(404, f"No status for job {job_id}.")
        return job.latest

    @app.get("/timings")
    async def timings(self, request: Request) -> dict[str, Any]:
        """Where the recent completed jobs spent their time on the server (epoch seconds per step:
        received, body (read), form (parsed), parsed (routed), admitted, replica_entered/admitted/done,
        completed); for benchmarks."""
        owner = self._auth(request.headers.get(API_KEY_HEADER))
        return {"jobs": {job_id: marks for job_id, who, marks in self._recent
                         if not self.keys.enabled or who == owner}}

    @app.get("/result/{token}")
    async def result(self, token: str) -> Response:
        # No API key: the client downloads result URLs without one; the token is unguessable.
        blob = self.results.get(token) if isinstance(self.results, MemoryResults) else None
        if blob is None:
            raise HttpError(404, "No such result (expired?).")
        return Response(blob, media_type="application/octet-stream")

    # --- job processing ----------------------------------------------------------------------

    def _record(self, job: Job, event: dict[str, Any], *, push: bool = True) -> dict[str, Any]:
        event = bounded_event(event)
        if event["status"] != "LOG":  # non-blocking polls see lifecycle states, like NDIF
            job.latest = event
        if push and job.session_id:
            self.jobs.push(job.session_id, json.dumps(event))
        return event

    def _push_if_still_latest(self, job: Job, event: dict[str, Any]) -> None:
        if job.latest is event and not job.done and job.session_id:
            self.jobs.push(job.session_id, json.dumps(event))

    async def _process(self, job: Job, stream: Any, queued: dict[str, Any], base_url: str) -> None:
        try:
            first = queued.get("position") == 1
            event = self._record(job, _response(job.id, "QUEUED", str(queued.get("description", "Queued."))),
                                 push=not first)
            if first and job.session_id:
                asyncio.get_running_loop().call_later(_QUIET_QUEUED_S, self._push_if_still_latest, job, event)
            pieces: list[bytes] = []  # a large result's CHUNK events (model_runtime/handoff.py)
            async for event in stream:
                if event["status"] == handoff.CHUNK:
                    pieces.append(event["data"])
                    continue
                await self._forward(job, handoff.join(event, pieces) if pieces else event, base_url)
                if event["status"] in ("COMPLETED", "ERROR"):
                    gateway_metrics().replica_report(job.model_key, event.get("report"))  # InfluxDB
                    return
            self._record(job, _response(job.id, "ERROR", "The model ended the job without a result."))
        except Exception as exc:
            log.exception("job %s failed in the gateway", job.id)
            self._record(job, _response(job.id, "ERROR", f"The server failed to run the job: {exc}"))
        finally:
            job.done = True
            # The one INFO line per request: ids only (never the key, the payload or the user's code).
            status = (job.latest or {}).get("status", "UNKNOWN")
            log.info("request %s on %s: %s", job.id, job.model_key, status, extra={
                "job_id": job.id, "model": job.model_key, "outcome": status, "caller": job.owner[:12] or None,
                "seconds": round(time.monotonic() - job.created, 3)})

    async def _forward(self, job: Job, event: dict[str, Any], base_url: str) -> None:
        status = event["status"]
        meta = event.get("meta")
        if status != "COMPLETED":
            self._record(job, _response(job.id, status, event.get("description", ""), meta=meta))
            return
        job.timings.update({f"replica_{k}": float(v) for k, v in (event.get("timings") or {}).items()},
                           completed=time.time())
        self._recent.append((job.id, job.owner, job.timings))
        frame = event.get("frame")
        if frame is not None and job.session_id:
            job.latest = _response(job.id, "COMPLETED", "Your job has been completed.", meta=meta)
            await self.jobs.deliver(job.session_id, frame)
            return
        url = await self.results.put(job.id, event["result"], base_url)
        self._record(job, _response(job.id, "COMPLETED", "Your job has been completed.", data=url, meta=meta))


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve entry point (`import_path: model_runtime.gateway.app:build_app`)."""
    validated = GatewayAppArgs.model_validate(args)
    return NnsightGateway.bind(validated.model_dump(mode="json"))  # type: ignore[attr-defined,no-any-return]

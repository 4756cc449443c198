"""The gateway application: the nnsight 0.8.1 ingress (`NnsightGateway`, route prefix `/`).

Speaks the unmodified client's protocol (research/nnsight-protocol.md §1.4):

* `WS /subscribe`: first frame `{"session_id": ...}`; then one frame per status of that session's
  jobs: JSON text, or a binary `ResponseModel.pickle()` for an inline COMPLETED result.
* `POST /request`: multipart `data` (the envelope JSON) + `blob`; answers `ResponseModel` RECEIVED
  with a server-minted job id, then QUEUED → RUNNING → LOG… → COMPLETED | ERROR follow on the
  websocket (blocking) or as the latest status at `GET /response/{id}` (non-blocking; 404 until
  the first status).
* `GET /result/{token}`: a result kept by the gateway when no object store is configured.
* `GET /status` (models with HOT/WARM/COLD and app state), `GET /env`, `GET /ping`.

Routing: a client key's `repo_id` (lower-cased) → `GatewayAppArgs.models` → the model app's
DeploymentHandle. Unknown → 404; COLD/WARM → 503 with the reason (a WARM model whose policy is
`activateOnRequest` has the demand recorded in `/status` for the operator). Full queue → 503.

The gateway imports neither torch nor nnsight: the model app builds inline result frames.
Job and session state live in this replica's memory, so the gateway runs as one replica.
"""

# No `from __future__ import annotations`: FastAPI must see real classes in the endpoint signatures
# that Serve rewrites (string annotations turn `websocket: WebSocket` into a query parameter).

import asyncio
import json
import logging
import os
import sys
import time
from importlib import metadata
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response
from ray import serve

from model_runtime.auth import ApiKeys
from model_runtime.jobs import Job, JobStore
from model_runtime.model_keys import client_model_key, repo_key, requested_revision
from model_runtime.results import MemoryResults, result_store
from model_runtime.versions import version_refusal
from ndif_operator.api import GatewayAppArgs
from ndif_operator.api.naming import GATEWAY_DEPLOYMENT

log = logging.getLogger("ray.serve")

API_KEY_HEADER = "ndif-api-key"
_INFO_TIMEOUT_S = 10.0
_HOT, _WARM, _COLD = "Hot", "Warm", "Cold"

app = FastAPI(title="NDIF gateway", docs_url=None, redoc_url=None)


class HttpError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def _response(job_id: str, status: str, description: str = "", data: Any = None,
              meta: dict[str, Any] | None = None) -> dict[str, Any]:
    # The JSON form of nnsight's ResponseModel (the client validates it with pydantic).
    return {"id": job_id, "status": status, "description": description, "data": data, "meta": meta}


@app.exception_handler(HttpError)
async def _http_error(request: Request, exc: HttpError) -> JSONResponse:
    # `{"detail": ...}` is what the nnsight client shows in its RemoteError.
    return JSONResponse({"detail": exc.detail}, status_code=exc.status)


@serve.deployment(name=GATEWAY_DEPLOYMENT, num_replicas=1, max_ongoing_requests=1000)
@serve.ingress(app)
class NnsightGateway:
    def __init__(self, args: dict[str, Any]) -> None:
        self.args = GatewayAppArgs.model_validate(args)
        self.models = {repo_key(k): v for k, v in self.args.models.items()}
        self.keys = ApiKeys.from_env(self.args.api_key_hashes_env)
        self.jobs = JobStore()
        self.results = result_store(self.args.object_store_bucket, self.args.object_store_endpoint_url)
        self._handles: dict[str, Any] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.activation_requests: dict[str, float] = {}
        self._keepalive_s = float(os.environ.get("NDIF_WS_KEEPALIVE_SECONDS", "20"))

    # --- helpers ----------------------------------------------------------------------------

    def _auth(self, key: str | None) -> str:
        owner = self.keys.check(key)
        if owner is None:
            raise HttpError(401, "Missing or invalid API key (header ndif-api-key).")
        return owner

    def _handle(self, app_name: str) -> Any:
        handle = self._handles.get(app_name)
        if handle is None:
            handle = serve.get_app_handle(app_name)
            self._handles[app_name] = handle
        return handle

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
        infos = await asyncio.gather(*(self._model_info(app_name) for app_name in self.models.values()))
        for (key, app_name), info in zip(self.models.items(), infos, strict=True):
            known = info or {}  # an app that is not running tells nothing: report it COLD
            repo_id = str(known.get("repo_id", key))
            revision = str(known.get("revision", "main"))
            trust = bool(known.get("trust_remote_code"))
            deployments[app_name] = {
                "model_key": client_model_key(repo_id, revision, trust),
                "repo_id": repo_id,
                "task": "text-generation",
                "trust_remote_code": trust,
                "revision": revision,
                "deployment_level": str(known.get("level", _COLD)).upper(),
                "application_state": await self._app_state(app_name, info),
                "queue_depth": known.get("queue_depth", 0),
                "activation_requested": key in self.activation_requests,
            }
        return {"deployments": deployments}

    async def _app_state(self, app_name: str, info: dict[str, Any] | None) -> str:
        if info is not None:
            return "UNHEALTHY" if info.get("wedged") else "RUNNING"
        try:
            apps = (await asyncio.to_thread(serve.status)).applications
        except Exception:
            return "UNHEALTHY"
        state = apps.get(app_name)
        if state is None:
            return "NOT_STARTED"
        return {"RUNNING": "RUNNING", "DEPLOYING": "DEPLOYING", "NOT_STARTED": "NOT_STARTED"}.get(
            str(state.status), "UNHEALTHY"
        )

    @app.websocket("/subscribe")
    async def subscribe(self, websocket: WebSocket) -> None:
        if self.keys.check(websocket.headers.get(API_KEY_HEADER)) is None:
            await websocket.close(code=1008, reason="Missing or invalid API key")
            return
        await websocket.accept()
        session_id, queue = self.jobs.open_session()
        await websocket.send_text(json.dumps({"session_id": session_id}))
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
                    if isinstance(frame, bytes):
                        await websocket.send_bytes(frame)
                    else:
                        await websocket.send_text(frame)
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
        owner = self._auth(request.headers.get(API_KEY_HEADER))
        refusal = version_refusal(request.headers.get("nnsight-version"), self.args.min_nnsight_version)
        if refusal:
            raise HttpError(400, refusal)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.args.max_request_bytes:
            # Refuse before the multipart parser spools the body to disk.
            raise HttpError(413, f"Request of {declared} bytes exceeds the gateway's limit of "
                                 f"{self.args.max_request_bytes} bytes.")
        data, blob = await self._multipart(request)
        try:
            envelope = json.loads(data)
            if not isinstance(envelope, dict):
                raise ValueError("not a JSON object")
            key = repo_key(str(envelope["model_key"]))
        except (ValueError, KeyError) as exc:
            raise HttpError(400, f"Invalid request envelope: {exc}") from None
        app_name = self.models.get(key)
        if app_name is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise HttpError(404, f"Model {key!r} is not deployed here (models: {known}).")
        info = await self._model_info(app_name)
        level = (info or {}).get("level", _COLD)
        if info is None:
            state = await self._app_state(app_name, None)
            if state == "DEPLOYING":
                raise HttpError(503, f"Model {key!r} is being deployed (loading); retry shortly.")
            raise HttpError(503, f"Model {key!r} is not running ({state}); ask an admin to make it Hot.")
        if level == _COLD:
            raise HttpError(503, f"Model {key!r} is COLD (not loaded); ask an admin to make it Hot.")
        wanted = requested_revision(str(envelope["model_key"]))
        if wanted is not None and wanted != info.get("revision"):
            raise HttpError(404, f"Model {key!r} is served at revision {info.get('revision')!r}, "
                                 f"not {wanted!r}.")
        if level == _WARM:
            if info.get("activate_on_request"):
                self.activation_requests[key] = time.time()
                raise HttpError(503, f"Model {key!r} is WARM (in CPU RAM); activation to HOT was requested, "
                                     "retry shortly.")
            raise HttpError(503, f"Model {key!r} is WARM (in CPU RAM, not serving); ask an admin to make it Hot.")
        if info.get("wedged"):
            raise HttpError(503, f"Model {key!r} is restarting after a job that could not be stopped; "
                                 "retry shortly.")
        if info.get("queue_depth", 0) >= info.get("max_queue_depth", 1):
            raise HttpError(503, f"The queue for model {key!r} is full; try again later.")
        payload = blob
        if len(payload) > int(info.get("max_payload_bytes", 0)):
            raise HttpError(413, f"Payload of {len(payload)} bytes exceeds this model's limit of "
                                 f"{info.get('max_payload_bytes')} bytes.")
        session_id = str(envelope.get("session_id") or "")
        if session_id and not self.jobs.has_session(session_id):
            raise HttpError(400, "Unknown session id: open /subscribe first.")
        job = self.jobs.new_job(key, owner, session_id)
        envelope["session_id"] = session_id
        received = _response(job.id, "RECEIVED", "Your job has been received and is waiting approval.")
        self._record(job, received, push=False)
        position = int(info.get("queue_depth", 0)) + 1
        task = asyncio.create_task(
            self._process(job, app_name, envelope, payload, str(request.base_url), position)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return received

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

    @app.get("/result/{token}")
    async def result(self, token: str) -> Response:
        # No API key: the client downloads result URLs without one; the token is unguessable.
        blob = self.results.get(token) if isinstance(self.results, MemoryResults) else None
        if blob is None:
            raise HttpError(404, "No such result (expired?).")
        return Response(blob, media_type="application/octet-stream")

    # --- job processing ----------------------------------------------------------------------

    def _record(self, job: Job, event: dict[str, Any], *, push: bool = True) -> None:
        if event["status"] != "LOG":  # non-blocking polls see lifecycle states, like NDIF
            job.latest = event
        if push and job.session_id:
            self.jobs.push(job.session_id, json.dumps(event))

    async def _process(
        self, job: Job, app_name: str, envelope: dict[str, Any], payload: bytes, base_url: str, position: int
    ) -> None:
        try:
            self._record(job, _response(job.id, "QUEUED", f"Moved to position {position} in the queue."))
            handle = self._handle(app_name).options(method_name="execute", stream=True)
            inline_max = self.args.inline_result_max_bytes if job.session_id else 0
            async for event in handle.remote(job.id, envelope, payload, inline_max):
                await self._forward(job, event, base_url)
                if event["status"] in ("COMPLETED", "ERROR"):
                    return
            self._record(job, _response(job.id, "ERROR", "The model ended the job without a result."))
        except Exception as exc:
            log.exception("job %s failed in the gateway", job.id)
            self._record(job, _response(job.id, "ERROR", f"The server failed to run the job: {exc}"))
        finally:
            job.done = True

    async def _forward(self, job: Job, event: dict[str, Any], base_url: str) -> None:
        status = event["status"]
        meta = event.get("meta")
        if status != "COMPLETED":
            self._record(job, _response(job.id, status, event.get("description", ""), meta=meta))
            return
        frame = event.get("frame")
        if frame is not None and job.session_id:
            job.latest = _response(job.id, "COMPLETED", "Your job has been completed.", meta=meta)
            self.jobs.push(job.session_id, frame)
            return
        url = await self.results.put(job.id, event["result"], base_url)
        self._record(job, _response(job.id, "COMPLETED", "Your job has been completed.", data=url, meta=meta))


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve entry point (`import_path: model_runtime.gateway_app:build_app`)."""
    validated = GatewayAppArgs.model_validate(args)
    return NnsightGateway.bind(validated.model_dump(mode="json"))  # type: ignore[attr-defined,no-any-return]

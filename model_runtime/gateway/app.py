"""The gateway application: the nnsight 0.8.1 ingress (`NnsightGateway`, route prefix `/`).

Speaks the unmodified client's protocol:

* `WS /subscribe`: first frame `{"session_id": ...}`; then one frame per status of that session's
  jobs: JSON text, or a binary `ResponseModel.pickle()` for an inline COMPLETED result.
* `POST /request`: multipart `data` (the envelope JSON) + `blob`; answers `ResponseModel` RECEIVED
  with a server-minted job id, then QUEUED → RUNNING → LOG… → COMPLETED | ERROR follow on the
  websocket (blocking) or as the latest status at `GET /response/{id}` (non-blocking; 404 until
  the first status).
* `GET /result/{token}`: a result kept by the gateway when no object store is configured.
* `GET /status` (models with HOT/WARM/COLD and app state), `GET /demand` (activation demand,
  long-polled), `GET /timings`, `GET /env`, `GET /ping`.

The routes are thin: each job has its module beside this one. `routing.py`: the routing table
(`GatewayUserConfig`, the deployment's `user_config`, replaced in place by `reconfigure`: adding or
removing a model never restarts the gateway and its in-memory sessions and jobs) and the model apps'
DeploymentHandles; `app_states.py`: Serve's application states and GPU waits; `running.py`: the
request path; `sessions.py`: the websockets; `status.py`: `/status`; `demand.py`: the demand notes;
`door.py` and `lean.py`: the direct port that serves the blocking client's two routes.

The gateway imports neither torch nor nnsight: the model app builds inline result frames.
Job and session state live in this replica's memory, so the gateway runs as one replica.
"""

# No `from __future__ import annotations`: FastAPI must see real classes in the endpoint signatures
# that Serve rewrites (string annotations turn `websocket: WebSocket` into a query parameter).

import asyncio
import sys
from importlib import metadata
from typing import Any

import ray
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from ray import serve

from model_runtime.gateway.app_states import AppStates
from model_runtime.gateway.auth import ApiKeys
from model_runtime.gateway.bounds import HttpError
from model_runtime.gateway.demand import Demand
from model_runtime.gateway.door import Door
from model_runtime.gateway.jobs import JobStore
from model_runtime.gateway.lean import LeanIngress
from model_runtime.gateway.results import MemoryResults, result_store
from model_runtime.gateway.routing import Routing
from model_runtime.gateway.running import RequestRunner
from model_runtime.gateway.sessions import Sessions
from model_runtime.gateway.status import status_answer
from model_runtime.metrics import gateway_metrics
from model_runtime.settings import RuntimeSettings
from ndif_operator import logs
from ndif_operator.api import GatewayAppArgs, GatewayUserConfig
from ndif_operator.api.naming import API_KEY_HEADER, GATEWAY_DEPLOYMENT

app = FastAPI(title="NDIF gateway", docs_url=None, redoc_url=None)


@app.exception_handler(HttpError)
async def _http_error(request: Request, exc: HttpError) -> JSONResponse:
    if request.url.path.endswith("/request"):
        # Tagged with a model only once it is known to be deployed (request.state.model, set by the endpoint).
        gateway_metrics().refusal(getattr(request.state, "model", "unknown"), exc.status)
    # `{"detail": ...}` is what the nnsight client shows in its RemoteError.
    return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)


@serve.deployment(name=GATEWAY_DEPLOYMENT, num_replicas=1, max_ongoing_requests=1000)
@serve.ingress(app)
class NnsightGateway:
    def __init__(self, args: dict[str, Any]) -> None:
        logs.setup_runtime()
        self.args = GatewayAppArgs.model_validate(args)
        # Deprecated static routes from args; the user_config table (reconfigure) replaces them.
        self.routing = Routing(self.args.models)
        self.states = AppStates()
        self.demands = Demand()
        self.keys = ApiKeys.from_env(self.args.api_key_hashes_env, self.args.api_key_hashes_dir)
        self.jobs = JobStore()
        self.results = result_store(self.args.object_store_bucket, self.args.object_store_endpoint_url)
        self.runner = RequestRunner(self.args, self.keys, self.jobs, self.results, self.routing, self.states,
                                    self.demands)
        self.sessions = Sessions(self.keys, self.jobs, RuntimeSettings.from_env().ws_keepalive_s)
        self._loop = asyncio.get_running_loop()  # Serve builds an ingress replica on its user-code loop
        self._door: Door | None = None

    def reconfigure(self, user_config: dict[str, Any] | None, rank: Any = None) -> None:
        """A new routing table, in place: sessions, jobs and open websockets are kept.

        Taking `rank` makes Serve call this once at start-up even without a user_config: the door
        opens here, after the first routing table, so a new replica never answers before it routes."""
        if user_config is not None:
            self.routing.update(GatewayUserConfig.model_validate(user_config))
            self.runner.channels.forget_except(self.routing.apps())
        self._open_door()

    def _open_door(self) -> None:
        if self._door is not None or self.args.direct_port is None:
            return
        # `app` (set by serve.ingress) is the ASGI app Serve itself serves, its routes bound to this
        # replica; the door serves it with the blocking client's two routes taken straight to the
        # runner's and the sessions' methods.
        self._door = Door(LeanIngress(getattr(self, "app"), self.runner.request, self.sessions.subscribe),  # noqa: B009
                          self.args.direct_host, self.args.direct_port,
                          owner=serve.get_replica_context().replica_tag,
                          node_id=ray.get_runtime_context().get_node_id(),
                          loop=self._loop, busy=lambda: bool(self.runner.tasks), succeeded=self._succeeded)
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

    # --- endpoints: thin calls into the modules that do each job ------------------------------

    @app.get("/ping")
    async def ping(self, request: Request) -> Response:
        self.keys.owner(request.headers.get(API_KEY_HEADER))
        return Response("pong", media_type="text/plain")

    @app.get("/env")
    async def env(self, request: Request) -> dict[str, Any]:
        self.keys.owner(request.headers.get(API_KEY_HEADER))
        packages = {d.metadata["Name"]: d.version for d in metadata.distributions() if d.metadata["Name"]}
        return {"python_version": sys.version, "packages": packages}

    @app.get("/status")
    async def status(self, request: Request) -> dict[str, Any]:
        self.keys.owner(request.headers.get(API_KEY_HEADER))
        return await status_answer(self.routing, self.states, self.demands)

    @app.websocket("/subscribe")
    async def subscribe(self, websocket: WebSocket) -> None:
        await self.sessions.subscribe(websocket)

    @app.post("/request")
    async def request(self, request: Request) -> dict[str, Any]:
        return await self.runner.request(request)

    @app.get("/demand")
    async def demand(self, request: Request, since: int = -1, timeout: float = 30.0) -> dict[str, Any]:
        """Activation demand, pushed: answers as soon as a demand newer than `since` is recorded
        (or after `timeout` seconds, at most 60). The operator and local mode watch this instead of
        polling `/status`; the body has `/status`'s shape for the requested models, plus `seq`."""
        self.keys.owner(request.headers.get(API_KEY_HEADER))
        await self.demands.wait(since, timeout)
        return self.demands.answer(self.routing.routes)

    @app.get("/response/{job_id}")
    async def response(self, job_id: str, request: Request) -> dict[str, Any]:
        owner = self.keys.owner(request.headers.get(API_KEY_HEADER))
        job = self.jobs.get(job_id)
        if job is None or job.latest is None or (self.keys.enabled and job.owner != owner):
            raise HttpError(404, f"No status for job {job_id}.")
        return job.latest

    @app.get("/timings")
    async def timings(self, request: Request) -> dict[str, Any]:
        """Where the recent completed jobs spent their time on the server (epoch seconds per step:
        received, body (read), form (parsed), parsed (routed), admitted, replica_entered/admitted/done,
        completed) and the path each took (`via`: "channel" or "serve"); for benchmarks. `paths`:
        this gateway's admission answers (refusals included) by path since it started, and the
        channel's fallbacks to Serve."""
        owner = self.keys.owner(request.headers.get(API_KEY_HEADER))
        return {"jobs": {job.id: {**job.timings, "via": job.via} for job in self.runner.recent
                         if not self.keys.enabled or job.owner == owner},
                "paths": dict(self.runner.channels.counts)}

    @app.get("/result/{token}")
    async def result(self, token: str) -> Response:
        # No API key: the client downloads result URLs without one; the token is unguessable.
        blob = self.results.get(token) if isinstance(self.results, MemoryResults) else None
        if blob is None:
            raise HttpError(404, "No such result (expired?).")
        return Response(blob, media_type="application/octet-stream")


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve entry point (`import_path: model_runtime.gateway.app:build_app`)."""
    validated = GatewayAppArgs.model_validate(args)
    return NnsightGateway.bind(validated.model_dump(mode="json"))  # type: ignore[attr-defined,no-any-return]

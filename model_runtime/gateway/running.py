"""The request path: `POST /request` admitted to its model app, and its job run to the end.

A served model is asked nothing before the request: its `execute` stream's first event is the
admission answer (QUEUED, or a refusal such as WARM / full queue / revision, which becomes the HTTP
error; a WARM model whose policy is `activateOnRequest` has the demand noted for the operator).
Unknown model → 404; COLD (routed, no app) → 503 "COLD"; an app without a running replica → 503
with its Serve state. Once admitted, the job's statuses (QUEUED → RUNNING → LOG… → COMPLETED |
ERROR) go to its session's websocket and to `GET /response/{id}`.

A request goes to its model's replica over the direct channel (model_runtime/gateway/channel.py)
when the app has one RUNNING replica whose channel is known, else through Serve's handle; a channel
that fails before the admission answer sends the request through Serve instead. `Job.via` says
which path it took.

Both ingresses call `RequestRunner.request` directly: the door's lean route and the gateway's
FastAPI route.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from typing import Any

from starlette.requests import Request

from model_runtime import handoff
from model_runtime.gateway.app_states import AppStates
from model_runtime.gateway.auth import ApiKeys
from model_runtime.gateway.bounds import HttpError, bounded_event, read_body_capped
from model_runtime.gateway.channel import ChannelBroken, Channels, ChannelStream
from model_runtime.gateway.demand import Demand
from model_runtime.gateway.jobs import Job, JobStore, JobStoreFull
from model_runtime.gateway.results import MemoryResults, S3Results
from model_runtime.gateway.routing import Routing
from model_runtime.metrics import gateway_metrics
from model_runtime.model_keys import repo_key
from model_runtime.settings import RuntimeSettings
from model_runtime.versions import version_refusal
from ndif_operator.api import GatewayAppArgs, Level
from ndif_operator.api.naming import API_KEY_HEADER

log = logging.getLogger("ray.serve")

# The model's first event (its admission answer) comes at once unless Serve has no replica to route to.
ADMISSION_TIMEOUT_S = 30.0
# A job first in its model's queue starts at once: its QUEUED frame goes to the client only if the job
# is still queued this long after admission (one websocket frame through the proxy fewer per small
# request). A job behind others hears its position at once.
QUIET_QUEUED_S = 0.05


def _response(job_id: str, status: str, description: str = "", data: Any = None,
              meta: dict[str, Any] | None = None) -> dict[str, Any]:
    # The JSON form of nnsight's ResponseModel (the client validates it with pydantic).
    return {"id": job_id, "status": status, "description": description, "data": data, "meta": meta}


async def _multipart(request: Request) -> tuple[str, bytes]:
    try:
        form = await request.form(max_files=1, max_fields=1)
    except Exception as exc:
        raise HttpError(400, f"Expected multipart/form-data with `data` and `blob`: {exc}") from None
    data, blob = form.get("data"), form.get("blob")
    if not isinstance(data, str) or blob is None or isinstance(blob, str):
        raise HttpError(400, "Expected multipart/form-data with a `data` field and a `blob` file.")
    return data, await blob.read()


class RequestRunner:
    def __init__(self, args: GatewayAppArgs, keys: ApiKeys, jobs: JobStore, results: MemoryResults | S3Results,
                 routing: Routing, states: AppStates, demand: Demand) -> None:
        self.args, self.keys, self.jobs, self.results = args, keys, jobs, results
        self.routing, self.states, self.demand = routing, states, demand
        # (app, by value) → (its handle, that handle with `execute`'s options, the chunk size): built once.
        self._executes: dict[tuple[str, bool], tuple[Any, Any, int]] = {}
        self._inflight: dict[str, int] = {}  # app → this gateway's jobs admitted and not finished
        self.tasks: set[asyncio.Task[None]] = set()  # the jobs being run
        self.recent: collections.deque[Job] = collections.deque(maxlen=256)  # completed: `GET /timings`
        self.channels = Channels(RuntimeSettings.from_env().direct_channel,
                                 lambda app_name: self.routing.handle(app_name).channel.remote())

    async def request(self, request: Request) -> dict[str, Any]:
        """`POST /request`: the RECEIVED answer of an admitted job, or an `HttpError`."""
        arrived = time.time()
        owner = self.keys.owner(request.headers.get(API_KEY_HEADER))
        refusal = version_refusal(request.headers.get("nnsight-version"), self.args.min_nnsight_version)
        if refusal:
            raise HttpError(400, refusal)
        await read_body_capped(request, self.args.max_request_bytes)
        body_read = time.time()
        data, blob = await _multipart(request)
        form_parsed = time.time()
        try:
            envelope = json.loads(data)
            if not isinstance(envelope, dict):
                raise ValueError("not a JSON object")
            key = repo_key(str(envelope["model_key"]))
        except (ValueError, KeyError) as exc:
            raise HttpError(400, f"Invalid request envelope: {exc}") from None
        routes = self.routing.routes
        route = routes.get(key)
        if route is None:
            known = ", ".join(sorted(routes)) or "none"
            raise HttpError(404, f"Model {key!r} is not deployed here (models: {known}).")
        request.state.model = key
        if route.app is None or route.level == Level.COLD:
            raise HttpError(503, f"Model {key!r} is COLD (on disk only, not loaded); ask an admin to make it "
                                 "Hot or Warm.")
        app_name = await self._pick_app(route.apps or [route.app])
        state = await self.states.now(app_name)
        wait = self.states.gpu_waits.get(route.deployment) if route.deployment else None
        if state == "DEPLOYING" and wait is not None:
            left = max(1, round(wait.since + wait.timeout_s - time.time()))
            raise HttpError(503, f"Model {key!r} is not serving yet: its replica is {wait.describe(time.time())}; "
                                 "retry later.", {"Retry-After": str(min(left, 30))})
        if state == "DEPLOYING":
            raise HttpError(503, f"Model {key!r} is being deployed (loading); retry shortly.")
        if state != "RUNNING":
            raise HttpError(503, f"Model {key!r} is not running ({state}); ask an admin to make it Hot.")
        limit = self.routing.payload_limits.get(app_name)
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
        self._inflight[app_name] = self._inflight.get(app_name, 0) + 1
        try:
            stream, first = await self._admission(key, app_name, job, envelope, blob, inline_max)
        except BaseException:
            self._done(app_name)
            raise
        job.timings["admitted"] = time.time()
        received = _response(job.id, "RECEIVED", "Your job has been received and is waiting approval.")
        self._record(job, received, push=False)
        gateway_metrics().admitted(key)
        task = asyncio.create_task(self._process(job, stream, first, str(request.base_url)))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(lambda _: self._done(app_name))
        return received

    async def _pick_app(self, apps: list[str]) -> str:
        """The application (one per pinned replica slot) with the fewest of this gateway's jobs in
        flight, among those Serve can route to; ties go to the lowest slot. An idle slot scaled to
        zero is picked once the running ones are busy, which is what makes Serve scale it up."""
        if len(apps) == 1:
            return apps[0]
        states = {app: await self.states.now(app) for app in apps}
        routable = [app for app in apps if states[app] in ("RUNNING", "DEPLOYING")] or apps
        return min(routable, key=lambda app: (self._inflight.get(app, 0), states[app] != "RUNNING",
                                              apps.index(app)))

    def _done(self, app_name: str) -> None:
        left = self._inflight.get(app_name, 0) - 1
        if left > 0:
            self._inflight[app_name] = left
        else:
            self._inflight.pop(app_name, None)

    async def _admission(self, key: str, app_name: str, job: Job, envelope: dict[str, Any], blob: bytes,
                         inline_max: int) -> tuple[Any, dict[str, Any]]:
        """The job's event stream and its admission answer: over the app's direct channel when one
        is usable, else (or when it fails before answering) through Serve's handle."""
        channel = self.channels.usable(app_name, self.states.replicas.get(app_name))
        if channel is not None:
            try:
                stream = await self.channels.open(channel, job.id, envelope, blob, inline_max)
                job.via = "channel"
                return stream, await self._first_event(key, app_name, job, stream)
            except ChannelBroken as exc:  # nothing was admitted: through Serve
                self.channels.counts["fallback"] += 1
                log.info("direct channel to %s failed before admission (%s); job %s goes through Serve",
                         app_name, exc, job.id)
        job.via = "serve"
        stream = self._admit(app_name, job, envelope, blob, inline_max)
        return stream, await self._first_event(key, app_name, job, stream)

    def _admit(self, app_name: str, job: Job, envelope: dict[str, Any], blob: bytes, inline_max: int) -> Any:
        try:
            base, by_value = self.routing.handle(app_name), len(blob) <= handoff.BY_VALUE_MAX_BYTES
            cached = self._executes.get((app_name, by_value))
            if cached is None or cached[0] is not base:
                options, chunk_bytes = handoff.call_options(len(blob))  # small ones by value, over gRPC
                cached = (base, base.options(method_name="execute", stream=True, **options), chunk_bytes)
                self._executes[(app_name, by_value)] = cached
            _, handle, chunk_bytes = cached
            return handle.remote(job.id, envelope, blob, inline_max, chunk_bytes)
        except Exception as exc:  # the app vanished between the state check and now
            self.jobs.discard(job.id)
            self.routing.forget(app_name)
            raise HttpError(503, f"Model {job.model_key!r} is not running ({exc}); retry shortly.") from None

    async def _first_event(self, key: str, app_name: str, job: Job, stream: Any) -> dict[str, Any]:
        """The model's admission answer: QUEUED, or a refusal that becomes this request's HTTP error."""
        try:
            async with asyncio.timeout(ADMISSION_TIMEOUT_S):  # no task of its own, unlike wait_for
                first: dict[str, Any] = await stream.__anext__()
        except ChannelBroken:
            raise  # the job is kept: it goes through Serve
        except Exception as exc:  # timeout, a stream that ended at once, or a dead app
            self.jobs.discard(job.id)
            with contextlib.suppress(Exception):
                stream.cancel()
            self.routing.forget(app_name)
            self.channels.forget(app_name)
            log.info("model app %s did not admit job %s: %r", app_name, job.id, exc)
            raise HttpError(503, f"Model {key!r} did not answer ({type(exc).__name__}); retry shortly.") from None
        self.channels.counts[job.via] += 1  # admission answers (refusals included) by path
        limits = first.get("limits") or {}
        if "max_payload_bytes" in limits:
            self.routing.payload_limits[app_name] = int(limits["max_payload_bytes"])
        if first.get("status") == "QUEUED":
            return first
        self.jobs.discard(job.id)
        gateway_metrics().replica_report(key, first.get("report"))  # InfluxDB: a full queue's refusal
        if first.get("activation_requested"):
            self.demand.note(key)
        retry = first.get("retry_after_s")
        headers = {"Retry-After": str(max(1, round(float(retry))))} if retry is not None else None
        raise HttpError(int(first.get("http_status", 503)), str(first.get("description", "Refused.")), headers)

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
                asyncio.get_running_loop().call_later(QUIET_QUEUED_S, self._push_if_still_latest, job, event)
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
            if isinstance(stream, ChannelStream):
                stream.release()  # its connection goes back to the pool, or closes if the job ended early
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
        self.recent.append(job)
        frame = event.get("frame")
        if frame is not None and job.session_id:
            job.latest = _response(job.id, "COMPLETED", "Your job has been completed.", meta=meta)
            await self.jobs.deliver(job.session_id, frame)
            return
        url = await self.results.put(job.id, event["result"], base_url)
        self._record(job, _response(job.id, "COMPLETED", "Your job has been completed.", data=url, meta=meta))

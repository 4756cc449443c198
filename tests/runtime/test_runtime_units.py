"""Pure pieces of the runtime: keys, API keys, version gate, jobs, results, S3 checkpoint staging."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from model_runtime import handoff
from model_runtime.gateway.auth import ApiKeys, key_digest
from model_runtime.gateway.jobs import JobStore, mint_id
from model_runtime.gateway.results import MemoryResults
from model_runtime.model_keys import client_model_key, repo_key, requested_revision
from model_runtime.versions import version_refusal


def test_repo_key_from_client_keys() -> None:
    key = 'nnsight.modeling.transformers.TransformersModel:{"repo_id": "Org/Model", "revision": null}'
    assert repo_key(key) == "org/model"
    assert repo_key("/tmp/Tiny") == "/tmp/tiny"
    assert repo_key(client_model_key("a/b", "main", False)) == "a/b"
    assert json.loads(client_model_key("a/b", "v2", True).split(":", 1)[1])["revision"] == "v2"
    assert requested_revision(key) is None and requested_revision("a/b") is None
    assert requested_revision(client_model_key("a/b", "main", False)) is None
    assert requested_revision('x:{"repo_id": "a/b", "revision": "v2"}') == "v2"
    for bad in ["", "  ", "x:{not json", 'x:{"revision": null}', 'x:{"repo_id": 3}']:
        with pytest.raises(ValueError):
            repo_key(bad)


def test_api_keys_compare_hashes() -> None:
    keys = ApiKeys({key_digest("secret"), ""})
    assert keys.enabled
    assert keys.check("secret") == key_digest("secret")
    assert keys.check("wrong") is None and keys.check(None) is None and keys.check("") is None
    off = ApiKeys(set())
    assert not off.enabled and off.check(None) == ""


def test_api_keys_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("K", f" {key_digest('a')} ,{key_digest('b').upper()}")
    keys = ApiKeys.from_env("K")
    assert keys.check("a") and keys.check("b") and keys.check("c") is None


@pytest.mark.parametrize(
    ("version", "refused"),
    [("0.8.1", False), ("0.9.0", False), ("0.8.0", True), ("", True), (None, True), ("banana", True)],
)
def test_version_gate(version: str | None, refused: bool) -> None:
    message = version_refusal(version, "0.8.1")
    assert (message is not None) == refused
    if message:
        assert "0.8.1" in message and "pip install" in message


def test_job_ids_are_unguessable_and_sessions_bounded() -> None:
    assert len({mint_id() for _ in range(1000)}) == 1000 and len(mint_id()) >= 32

    async def scenario() -> None:
        store = JobStore(max_session_frames=2)
        session, queue = store.open_session()
        for i in range(5):
            store.push(session, f"frame {i}")
        assert queue.qsize() == 2  # a client that never reads cannot grow the gateway's memory
        job = store.new_job("m", "", session)
        assert store.get(job.id) is job and store.in_flight("m") == 1
        store.close_session(session)
        assert not store.has_session(session)

    asyncio.run(scenario())


def test_a_result_frame_goes_straight_out_only_behind_nothing() -> None:
    """`deliver` sends on the websocket at once when the session has nothing queued or being sent;
    otherwise the frame waits its turn in the queue (frames keep the order they were pushed in)."""

    async def scenario() -> None:
        store = JobStore()
        session, queue = store.open_session()
        sent: list[str | bytes] = []

        async def send(frame: str | bytes) -> None:
            sent.append(frame)

        await store.deliver(session, b"before attach")  # no websocket loop yet: queued
        store.attach(session, send)
        await store.deliver(session, b"behind a queued frame")
        assert sent == [] and queue.qsize() == 2
        for _ in range(2):  # the websocket loop sends what was queued
            await send(queue.get_nowait())
            store.sent(session)
        await store.deliver(session, b"result")
        assert sent == [b"before attach", b"behind a queued frame", b"result"] and queue.empty()
        store.close_session(session)
        await store.deliver(session, b"late")  # a closed session drops it
        assert len(sent) == 3

    asyncio.run(scenario())


def test_memory_results_are_bounded() -> None:
    async def scenario() -> None:
        results = MemoryResults(max_bytes=10)
        first = await results.put("a", b"12345678", "http://gw/")
        second = await results.put("b", b"abcdefgh", "http://gw")
        assert second.startswith("http://gw/result/")
        assert results.get(second.rsplit("/", 1)[1]) == b"abcdefgh"
        assert results.get(first.rsplit("/", 1)[1]) is None  # evicted beyond max_bytes

    asyncio.run(scenario())


def test_s3_checkpoint_loads(tiny_llama: Path, s3_endpoint: str, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch, local_model: Any) -> None:
    import boto3
    import torch

    from model_runtime.replica.loading import load_model
    from ndif_operator.api import ModelAppArgs

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="models")
    for file in tiny_llama.iterdir():
        s3.upload_file(str(file), "models", f"ckpt/tiny/{file.name}")
    monkeypatch.setenv("NDIF_MODEL_CACHE_DIR", str(tmp_path))
    args = ModelAppArgs(
        model_key="org/tiny", deployment="ns/tiny", repo_id="org/tiny", dtype="float32",
        source={"s3": {"bucket": "models", "prefix": "ckpt/tiny", "endpoint_url": s3_endpoint}},
    )
    loaded = load_model(args)
    assert loaded.source_kind == "s3" and loaded.device == "cpu"
    assert (tmp_path / "models" / "ckpt" / "tiny" / "config.json").exists()
    with loaded.model.trace("Paris"):
        out = loaded.model.lm_head.output.save()
    with local_model.trace("Paris"):
        ref = local_model.lm_head.output.save()
    assert torch.equal(out, ref)
    empty = args.model_copy(update={"source": args.source.model_copy(
        update={"s3": args.source.s3.model_copy(update={"prefix": "nothing/here"})})})  # type: ignore[union-attr]
    with pytest.raises(FileNotFoundError, match="no objects"):
        load_model(empty)


def test_the_gateway_writes_the_replicas_influx_points(monkeypatch: pytest.MonkeyPatch) -> None:
    """The replica's metrics hold no InfluxDB writer or token; its report, written by the gateway,
    reaches an InfluxDB v2 write endpoint with tags model/outcome/source only."""
    from runtime.wire import InfluxSink

    with InfluxSink() as sink:
        monkeypatch.setenv("NDIF_INFLUX_URL", sink.url)
        monkeypatch.setenv("NDIF_INFLUX_TOKEN", "influx-secret-token")
        monkeypatch.setenv("NDIF_INFLUX_ORG", "ndif")
        from model_runtime import credentials
        from model_runtime.metrics import GatewayMetrics, RuntimeMetrics

        monkeypatch.setattr(credentials, "_TAKEN", None)
        monkeypatch.setattr(credentials, "_KEEP", None)
        monkeypatch.setattr(credentials, "scrub", lambda names: None)  # this process is the test's
        replica = RuntimeMetrics()
        assert "influx-secret-token" not in repr(vars(replica))
        assert not any("influx" in name.lower() for name in vars(replica))
        replica.model_load("org/model", "s3", 3.5)
        report = replica.request("org/model", "completed", 0.25, 1000, 2000)
        assert replica.request("org/model", "completed", 0.1, 1, 1)["loads"] == []  # each load reported once
        gateway = GatewayMetrics()
        gateway.replica_report("org/model", report)
        gateway.close()
        credentials.forget()
    text = sink.text()
    assert "request,model=org/model,outcome=completed" in text
    assert "model_load,model=org/model,source=s3" in text
    assert "influx-secret-token" not in text and "bucket=ndif" in text
    assert {auth for auth, _ in sink.writes} == {"Token influx-secret-token"}  # the gateway holds it
    snapshot = replica.snapshot()
    assert snapshot["requests_completed"] == 2 and snapshot["bytes_out"] == 2001


def test_a_forged_replica_report_writes_only_checked_points() -> None:
    """A replica runs users' code: the gateway keeps only known fields, finite numbers and the
    fixed vocabularies of a report, and the model tag is the gateway's own."""
    from model_runtime.metrics import MAX_REPORTED_LOADS, report_points

    assert report_points({"outcome": "completed", "seconds": 0.5, "bytes_in": 3, "bytes_out": 4, "loads": []}) == [
        ("request", {"outcome": "completed"}, {"seconds": 0.5, "bytes_in": 3.0, "bytes_out": 4.0})]
    forged: list[Any] = [
        None, "text", [], {"outcome": "pwned", "seconds": 1, "bytes_in": 1, "bytes_out": 1},
        {"outcome": "completed", "seconds": float("nan"), "bytes_in": 1, "bytes_out": 1},
        {"outcome": "completed", "seconds": -1, "bytes_in": 1, "bytes_out": 1},
        {"outcome": "completed", "seconds": True, "bytes_in": 1, "bytes_out": 1},
        {"outcome": "completed", "seconds": "1", "bytes_in": 1, "bytes_out": 1},
        {"loads": [{"source": "s3,model=other", "seconds": 1}, {"source": "x" * 40, "seconds": 1},
                   {"source": "s4", "seconds": 1}, {"source": ["s3"], "seconds": 1},
                   {"source": "s3", "seconds": float("inf")}, "s3", {"source": 3, "seconds": 1}]},
    ]
    for report in forged:
        assert report_points(report) == [], report
    many = report_points({"loads": [{"source": "s3", "seconds": 1}] * 1000})
    assert len(many) == MAX_REPORTED_LOADS
    tags = report_points({"outcome": "error", "seconds": 1, "bytes_in": 1, "bytes_out": 0, "model": "other",
                          "extra": "x"})[0][1]
    assert tags == {"outcome": "error"}


def test_every_load_source_a_replica_reports_is_in_the_gateways_vocabulary() -> None:
    """The replica reports a load by its source kind, the node's store, or `activate_from_<level>`."""
    from typing import get_args, get_type_hints

    from model_runtime.metrics import LOAD_SOURCES
    from model_runtime.replica import levels
    from model_runtime.replica.host_copy import NODE_MEMORY
    from ndif_operator.api.v1alpha1 import ModelSource

    kinds = set(get_args(get_type_hints(ModelSource.kind.fget)["return"]))
    activations = {f"activate_from_{level.lower()}" for level in levels.LEVELS if level != levels.HOT}
    assert kinds | {NODE_MEMORY} | activations == LOAD_SOURCES


@pytest.mark.slow
def test_hugging_face_source_reads_the_offline_cache(tiny_llama: Path, tmp_path: Path, local_model: Any) -> None:
    """`source: huggingFace` by repo id and revision, from a node's HF cache with the Hub offline."""
    import shutil
    import subprocess
    import sys

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny-llama"
    shutil.copytree(tiny_llama, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = (
        "import torch\n"
        "from model_runtime.replica.loading import load_model\n"
        "from ndif_operator.api import ModelAppArgs\n"
        "m = load_model(ModelAppArgs(model_key='org/tiny-llama', deployment='ns/t', repo_id='org/tiny-llama',"
        " source={'hugging_face': {}}, dtype='float32'))\n"
        "with m.model.trace('Paris'):\n"
        "    out = m.model.lm_head.output.save()\n"
        "print(m.source_kind, repr(out.sum().item()))\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    kind, total = done.stdout.strip().splitlines()[-1].split()
    with local_model.trace("Paris"):
        ref = local_model.lm_head.output.save()
    assert kind == "huggingFace" and float(total) == ref.sum().item()


def test_api_keys_rotate_from_a_mounted_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from model_runtime.gateway import auth

    # Kubelet's layout of a mounted Secret: a timestamped dir, `..data` pointing at it, keys linking through it.
    def mount(digests: dict[str, str], stamp: str) -> None:
        data = tmp_path / stamp
        data.mkdir()
        for name, digest in digests.items():
            (data / name).write_text(digest)
        (tmp_path / "..data_tmp").symlink_to(stamp)
        (tmp_path / "..data_tmp").replace(tmp_path / "..data")
        for name in digests:
            if not (tmp_path / name).is_symlink():
                (tmp_path / name).symlink_to(f"..data/{name}")

    mount({"alice": key_digest("a")}, "..2026_01")
    monkeypatch.setattr(auth, "RELOAD_SECONDS", 0.0)
    keys = ApiKeys.from_env("UNSET_NDIF_VAR", tmp_path)
    assert keys.check("a") and keys.check("b") is None
    mount({"alice": key_digest("b")}, "..2026_02")  # rotated: a's key replaced by b's
    assert keys.check("b") and keys.check("a") is None
    empty = ApiKeys(set(), tmp_path / "missing")  # configured but unreadable: closed, never open
    assert empty.enabled and empty.check("a") is None


def test_queued_frame_goes_out_only_for_a_job_that_waits() -> None:
    """A job behind others hears its position at once; the first in line is told only if it is still
    queued after a short quiet period (a small job goes straight to COMPLETED: one frame fewer)."""
    from model_runtime.gateway.running import RequestRunner

    async def scenario() -> None:
        runner = object.__new__(RequestRunner)
        runner.jobs = JobStore()
        session, frames = runner.jobs.open_session()
        release = asyncio.Event()

        async def held_stream() -> Any:  # the replica has not answered past QUEUED yet
            await release.wait()
            return
            yield

        first = runner.jobs.new_job("m", "", session)
        behind = runner.jobs.new_job("m", "", session)
        # The first in line is processed first, yet its QUEUED frame comes second: it was held back.
        tasks = [asyncio.create_task(runner._process(job, held_stream(), queued, "http://gw"))
                 for job, queued in ((first, {"position": 1, "description": "Moved to position 1 in the queue."}),
                                     (behind, {"position": 2, "description": "Moved to position 2 in the queue."}))]
        told = [json.loads(await frames.get()) for _ in range(2)]
        assert [(f["id"], f["status"]) for f in told] == [(behind.id, "QUEUED"), (first.id, "QUEUED")]
        assert "position 2" in told[0]["description"]
        release.set()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


def test_small_requests_go_by_value_and_large_results_in_chunks() -> None:
    """A small payload takes Serve's gRPC transport (by value), whose messages are capped: a result
    larger than a chunk comes as CHUNK events the gateway joins back; a large payload goes by reference."""
    options, chunk = handoff.call_options(handoff.BY_VALUE_MAX_BYTES)
    assert options["_by_reference"] is False and chunk == handoff.CHUNK_BYTES
    assert handoff.call_options(handoff.BY_VALUE_MAX_BYTES + 1) == ({}, 0)

    frame = bytes(range(256)) * 41  # 10 496 bytes
    event = {"status": "COMPLETED", "frame": frame, "meta": {"runtime": 0.1}}
    pieces = list(handoff.split(event, 4096))
    assert [p["status"] for p in pieces] == [handoff.CHUNK] * 3
    assert max(len(p["data"]) for p in pieces) == 4096 and "frame" not in event
    joined = handoff.join(event, [p["data"] for p in pieces])
    assert joined == {"status": "COMPLETED", "frame": frame, "meta": {"runtime": 0.1}}

    small = {"status": "COMPLETED", "result": b"x" * 4096}
    assert list(handoff.split(small, 4096)) == [] and small["result"] == b"x" * 4096
    assert list(handoff.split({"status": "COMPLETED", "result": frame}, 0)) == []  # by reference: no cap


def test_app_states_name_serves_statuses_plainly() -> None:
    """The gateway's 503s and /status compare plain names: a deploying app must read "DEPLOYING",
    and an app with a running replica is routable. The details are in the JSON shape of Serve's
    own schema (what its controller sends), with its own enum values."""
    from ray.serve._private.common import ReplicaState
    from ray.serve.schema import (
        ApplicationDetails,
        ApplicationStatus,
        DeploymentDetails,
        ReplicaDetails,
        ServeInstanceDetails,
    )

    from model_runtime.gateway.app_states import app_states

    # The keys the gateway reads are Serve's schema fields.
    assert "applications" in ServeInstanceDetails.model_fields
    assert {"status", "deployments"} <= set(ApplicationDetails.model_fields)
    assert "replicas" in DeploymentDetails.model_fields and "state" in ReplicaDetails.model_fields

    def app(status: ApplicationStatus, *replicas: ReplicaState, plain: bool = False) -> dict[str, object]:
        # The controller's dict holds the enums themselves (its model_dump is not in JSON mode).
        return {"status": status.value if plain else status,
                "deployments": {"model": {"replicas": [{"state": r.value if plain else r} for r in replicas]}}}

    for plain in (False, True):
        states = app_states({"applications": {
            "loading": app(ApplicationStatus.DEPLOYING, ReplicaState.STARTING, plain=plain),
            "rolling": app(ApplicationStatus.DEPLOYING, ReplicaState.RUNNING, ReplicaState.STARTING, plain=plain),
            "failed": app(ApplicationStatus.DEPLOY_FAILED, plain=plain)}})
        assert states == {"loading": "DEPLOYING", "rolling": "RUNNING", "failed": "DEPLOY_FAILED"}
    assert app_states({}) == {}


def test_the_doors_lean_routes_answer_as_fastapi_does() -> None:
    """The door serves `POST /request` and `WS /subscribe` straight from the gateway's methods: a
    refusal comes out of the FastAPI app's own exception handler (same status, `detail`, headers),
    a success is the same JSON, a streamed body is still capped, and other routes go to FastAPI."""
    from starlette.requests import Request
    from starlette.websockets import WebSocket

    from model_runtime.gateway import app as gateway_app
    from model_runtime.gateway.bounds import HttpError, read_body_capped
    from model_runtime.gateway.lean import LeanIngress

    seen: list[str] = []

    class Routes:
        async def request(self, request: Request) -> dict[str, Any]:
            await read_body_capped(request, 10)
            if request.headers.get("ndif-api-key") != "k":
                raise HttpError(503, "Model 'm' is not serving yet.", {"Retry-After": "7"})
            return {"id": "j", "status": "RECEIVED", "description": "é", "data": None, "meta": None}

        async def subscribe(self, websocket: WebSocket) -> None:
            seen.append(websocket.url.path)

    async def fastapi(scope: Any, receive: Any, send: Any) -> None:
        seen.append(f"fastapi {scope['path']}")

    fastapi.exception_handlers = gateway_app.app.exception_handlers  # type: ignore[attr-defined]
    routes = Routes()
    lean = LeanIngress(fastapi, routes.request, routes.subscribe)

    async def call(scope: dict[str, Any], chunks: list[bytes]) -> tuple[int, dict[str, str], Any]:
        pending, sent = list(chunks), []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": pending.pop(0) if pending else b"", "more_body": len(pending) > 1}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await lean({"type": "http", "method": "POST", "path": "/request", "headers": [], "query_string": b"",
                    "server": ("127.0.0.1", 80), **scope}, receive, send)
        headers = {k.decode(): v.decode() for k, v in sent[0].get("headers", [])}
        return sent[0]["status"], headers, json.loads(sent[1]["body"]) if len(sent) > 1 else None

    status, headers, body = asyncio.run(call({"headers": [(b"ndif-api-key", b"k")]}, [b"ok"]))
    assert status == 200 and headers["content-type"] == "application/json" and body["description"] == "é"
    status, headers, body = asyncio.run(call({}, [b"ok"]))
    assert (status, headers["retry-after"], body) == (503, "7", {"detail": "Model 'm' is not serving yet."})
    status, _, body = asyncio.run(call({}, [b"x" * 6, b"x" * 6, b""]))  # chunked: no Content-Length
    assert status == 413 and "exceeds" in body["detail"]
    asyncio.run(lean({"type": "http", "method": "GET", "path": "/status"}, None, None))  # type: ignore[arg-type]
    asyncio.run(lean({"type": "websocket", "path": "/subscribe", "headers": [], "query_string": b"",
                      "server": ("127.0.0.1", 80)}, None, None))  # type: ignore[arg-type]
    assert seen == ["fastapi /status", "/subscribe"]

"""The direct channel between the gateway and a model replica, in-process: the framing, the
replica's server (model_runtime/replica/channel.py) in front of a stand-in `execute`, the gateway's
pool and rules (model_runtime/gateway/channel.py), and the gateway's fallback to Serve
(model_runtime/gateway/running.py). Through real Ray Serve: tests/runtime/test_channel_serve.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from model_runtime.channel_wire import FRAME_MARGIN_BYTES, HEADER, FrameError, encode, read_frame
from model_runtime.gateway import channel as gateway_channel
from model_runtime.gateway.channel import GONE, Channel, ChannelBroken, Channels, ChannelStream, channel_of
from model_runtime.gateway.jobs import JobStore
from model_runtime.replica.channel import ChannelServer

LOOPBACK = "127.0.0.1"
MAX_REQUEST = 4096


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_frames_round_trip_data_only() -> None:
    event = {"status": "COMPLETED", "frame": b"\x00" * 10, "meta": {"runtime": 0.5, "n": [1, 2]}, "text": "é"}
    assert await read_frame(_reader(b"".join(encode(event))), 1000) == event
    # A value msgpack cannot carry goes as its text, never as an object to rebuild.
    assert await read_frame(_reader(b"".join(encode({"x": object}))), 1000) == {"x": str(object)}


async def test_a_frame_over_the_cap_is_refused_before_its_body_is_read() -> None:
    reader = _reader(HEADER.pack(10_000) + b"\x00" * 16)
    with pytest.raises(FrameError, match="over this reader's cap"):
        await read_frame(reader, 1000)
    assert await reader.read() == b"\x00" * 16  # the body was left unread


async def test_a_frame_that_is_not_msgpack_is_refused() -> None:
    body = b"\xc1"  # a byte msgpack never uses
    with pytest.raises(FrameError, match="not msgpack"):
        await read_frame(_reader(HEADER.pack(len(body)) + body), 1000)
    pickled = b"\x80\x04\x95"  # a pickle is not decoded as one either
    with pytest.raises(FrameError):
        await read_frame(_reader(HEADER.pack(len(pickled)) + pickled), 1000)


class FakeReplica:
    """`execute`'s stand-in: QUEUED, then COMPLETED with the blob reversed; `hold` keeps a job queued."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.closed: list[str] = []  # jobs whose generator was closed before its end
        self.hold = asyncio.Event()
        self.hold.set()
        self.result_bytes = 0

    async def execute(self, job_id: str, envelope: dict[str, Any], blob: bytes, inline_max: int,
                      chunk_bytes: int) -> AsyncIterator[dict[str, Any]]:
        assert chunk_bytes == 0  # the channel has no message cap: no CHUNK events
        self.calls.append(job_id)
        ended = False
        try:
            if envelope.get("refuse"):
                yield {"status": "ERROR", "description": "WARM", "http_status": 503}
                ended = True
                return
            yield {"status": "QUEUED", "position": 1, "limits": {"max_payload_bytes": MAX_REQUEST}}
            await self.hold.wait()
            yield {"status": "COMPLETED", "result": self.result_bytes * b"r" or blob[::-1], "meta": {}}
            ended = True
        finally:
            if not ended:
                self.closed.append(job_id)


@pytest.fixture()
async def replica() -> AsyncIterator[tuple[FakeReplica, ChannelServer]]:
    fake = FakeReplica()
    server = ChannelServer(fake.execute, lambda: MAX_REQUEST, "replica-1")
    await server.start(LOOPBACK)
    yield fake, server
    server.close()


def _channels(server: ChannelServer, answer: Callable[[], dict[str, Any]] | None = None) -> Channels:
    async def ask(app_name: str) -> dict[str, Any]:
        return answer() if answer is not None else {**server.info(), "max_result_bytes": 1000}

    return Channels(True, ask)


async def _learned(channels: Channels, app: str = "app", replica: str = "replica-1") -> Channel:
    assert channels.usable(app, frozenset({replica})) is None  # unknown yet: asked in the background
    for _ in range(100):
        await asyncio.sleep(0.01)
        channel = channels.usable(app, frozenset({replica}))
        if channel is not None:
            return channel
    raise AssertionError("the channel was not learned")


async def test_requests_run_through_execute_and_connections_are_reused(replica: Any) -> None:
    fake, server = replica
    channels = _channels(server)
    channel = await _learned(channels)
    for job in ("a", "b"):
        stream = await channels.open(channel, job, {}, b"abc", 0)
        events = [event async for event in stream]
        assert [e["status"] for e in events] == ["QUEUED", "COMPLETED"] and events[1]["result"] == b"cba"
    assert fake.calls == ["a", "b"] and len(channel.idle) == 1  # one connection served both

    stream = await channels.open(channel, "warm", {"refuse": True}, b"", 0)
    assert [e["status"] async for e in stream] == ["ERROR"]  # a refusal is the terminal event
    assert len(channel.idle) == 1


async def test_the_channel_is_used_only_for_its_one_running_replica(replica: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _, server = replica
    asked: list[str] = []

    def answer() -> dict[str, Any]:
        asked.append("x")
        return {**server.info(), "max_result_bytes": 1000}

    channels = _channels(server, answer)
    channel = await _learned(channels)
    assert channels.usable("app", frozenset({"replica-1", "replica-2"})) is None  # Serve routes between them
    assert channels.usable("app", None) is None and channels.usable("app", frozenset()) is None
    assert channels.usable("app", frozenset({"replica-1"})) is channel
    assert channels.usable("app", frozenset({"replica-2"})) is None  # replaced: forgotten
    await asyncio.sleep(0.05)
    assert len(asked) == 1  # asked again only ASK_EVERY_S after the last ask
    monkeypatch.setattr(gateway_channel, "ASK_EVERY_S", 0.0)
    assert channels.usable("app", frozenset({"replica-2"})) is None
    await asyncio.sleep(0.05)
    assert len(asked) == 2
    assert Channels(False, lambda app: None).usable("app", frozenset({"replica-1"})) is None  # switched off


def test_a_channel_answer_is_checked() -> None:
    channel = channel_of("app", {"host": LOOPBACK, "port": 1, "token": b"t" * 32, "replica_id": "r",
                                 "max_result_bytes": 10})
    assert channel.max_frame == 10 + FRAME_MARGIN_BYTES
    with pytest.raises(ValueError):
        channel_of("app", {"host": LOOPBACK})


async def _raw(server: ChannelServer, token: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(token)
    return reader, writer


async def test_a_wrong_token_is_closed_before_anything_runs(replica: Any) -> None:
    fake, server = replica
    reader, writer = await _raw(server, b"x" * 32)
    writer.writelines(encode({"job_id": "evil", "envelope": {}, "blob": b"", "inline_max": 0}))
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing answered
    assert fake.calls == [] and server.refused == 1
    writer.close()


async def test_an_oversize_or_malformed_request_is_closed(replica: Any) -> None:
    fake, server = replica
    reader, writer = await _raw(server, server.token)
    writer.write(HEADER.pack(MAX_REQUEST + 1))
    assert await asyncio.wait_for(reader.read(), 5) == b""
    reader, writer = await _raw(server, server.token)
    writer.writelines(encode({"job_id": 1, "envelope": [], "blob": "", "inline_max": 0}))
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert fake.calls == [] and server.refused == 2


async def _held(replica: Any, *jobs: str) -> tuple[Channels, Channel, list[ChannelStream]]:
    """Jobs the stand-in replica admitted and holds (QUEUED read), each on a connection of its own."""
    fake, server = replica
    fake.hold.clear()
    channels = _channels(server)
    channel = await _learned(channels)
    streams = [await channels.open(channel, job, {}, b"abc", 0) for job in jobs]
    for stream in streams:
        assert (await stream.__anext__())["status"] == "QUEUED"
    return channels, channel, streams


async def test_a_gateway_that_leaves_takes_its_queued_job_out(replica: Any) -> None:
    fake, _ = replica
    _, _, [stream] = await _held(replica, "waiting")
    stream.cancel()  # as `_first_event` does on a timeout
    for _ in range(100):
        if fake.closed:
            break
        await asyncio.sleep(0.01)
    assert fake.closed == ["waiting"]


async def test_an_oversize_event_ends_the_job_with_an_error(replica: Any) -> None:
    fake, server = replica
    fake.result_bytes = 1000 + FRAME_MARGIN_BYTES + 1  # over the gateway's cap of the replica's answer
    channels = _channels(server)
    channel = await _learned(channels)
    stream = await channels.open(channel, "big", {}, b"", 0)
    events = [event async for event in stream]
    assert [e["status"] for e in events] == ["QUEUED", "ERROR"] and events[1]["description"] == GONE


async def test_a_replica_gone_before_admission_is_channel_broken(replica: Any) -> None:
    _, server = replica
    channels = _channels(server)
    channel = await _learned(channels)
    stream = await channels.open(channel, "a", {}, b"abc", 0)
    assert [e["status"] async for e in stream] == ["QUEUED", "COMPLETED"]
    server.close()  # the replica goes: its pooled connection ends, new ones are refused
    await asyncio.sleep(0.05)
    with pytest.raises(ChannelBroken):
        stream = await channels.open(channel, "b", {}, b"abc", 0)
        await stream.__anext__()
    assert channels.usable("app", frozenset({"replica-1"})) is None  # forgotten


class FakeServe:
    """Serve's handle: the stream `execute` gives, through `routing.handle(app).options(...).remote(...)`."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def handle(self, app_name: str) -> Any:
        return self

    def options(self, **options: Any) -> Any:
        return self

    def remote(self, job_id: str, envelope: Any, blob: bytes, inline_max: int, chunk_bytes: int) -> Any:
        self.calls.append(job_id)

        async def events() -> AsyncIterator[dict[str, Any]]:
            yield {"status": "QUEUED", "position": 1}
            yield {"status": "COMPLETED", "result": b"serve"}

        return events()

    def forget(self, app_name: str) -> None:
        pass


async def test_the_gateway_falls_back_to_serve_when_the_channel_is_gone(replica: Any) -> None:
    """A known channel whose replica is gone (connect refused): the request goes through Serve and succeeds."""
    from types import SimpleNamespace

    from model_runtime.gateway.running import RequestRunner

    _, server = replica
    channels = _channels(server)
    await _learned(channels)
    server.close()
    runner = object.__new__(RequestRunner)
    runner.jobs, runner.channels, runner._executes = JobStore(), channels, {}
    runner.routing = FakeServe()  # type: ignore[assignment]
    runner.routing.payload_limits = {}  # type: ignore[attr-defined]
    runner.states = SimpleNamespace(replicas={"app": frozenset({"replica-1"})})  # type: ignore[assignment]
    job = runner.jobs.new_job("m", "", "")
    stream, first = await runner._admission("m", "app", job, {}, b"abc", 0)
    assert first["status"] == "QUEUED" and job.via == "serve" and runner.routing.calls == [job.id]  # type: ignore[attr-defined]
    assert [e["status"] async for e in stream] == ["COMPLETED"]
    assert channels.counts == {"fallback": 1, "serve": 1}
    assert runner.jobs.get(job.id) is job  # the job was kept for Serve, not discarded



def test_the_channel_serves_only_apps_that_do_not_autoscale() -> None:
    """Serve's details → RUNNING replica ids per app; an autoscaled app is left out (Serve's autoscaler
    counts handle calls only: a replica busy over the channel would look idle)."""
    from ray.serve._private.common import ReplicaState

    from model_runtime.gateway.app_states import channel_replicas

    def app(*replicas: tuple[str, ReplicaState], autoscaling: dict[str, Any] | None = None) -> dict[str, Any]:
        config = {"name": "ModelReplica", **({"autoscaling_config": autoscaling} if autoscaling else {})}
        return {"deployments": {"ModelReplica": {
            "deployment_config": config,
            "replicas": [{"replica_id": rid, "state": state} for rid, state in replicas]}}}

    details = {"applications": {
        "one": app(("a", ReplicaState.RUNNING)),
        "rolling": app(("b", ReplicaState.RUNNING), ("c", ReplicaState.STARTING)),
        "two": app(("d", ReplicaState.RUNNING), ("e", ReplicaState.RUNNING)),
        "slot": app(("f", ReplicaState.RUNNING), autoscaling={"min_replicas": 0, "max_replicas": 1}),
    }}
    assert channel_replicas(details) == {"one": frozenset({"a"}), "rolling": frozenset({"b"}),
                                         "two": frozenset({"d", "e"})}
    assert channel_replicas({}) == {}


async def test_a_failed_ask_waits_longer_before_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica without `channel()` (an older image) is not asked every 2 s: Serve's path meanwhile."""
    asked: list[str] = []

    async def ask(app_name: str) -> dict[str, Any]:
        asked.append(app_name)
        raise AttributeError("no method channel")

    channels = Channels(True, ask)
    monkeypatch.setattr(gateway_channel, "ASK_EVERY_S", 0.0)
    assert channels.usable("app", frozenset({"r"})) is None
    await asyncio.sleep(0.05)
    assert channels.usable("app", frozenset({"r"})) is None
    await asyncio.sleep(0.05)
    assert asked == ["app"]


async def test_a_stopping_replica_finishes_its_jobs_and_turns_new_ones_to_serve(replica: Any) -> None:
    """Serve's drain counts handle calls only: the channel drains its own jobs before the replica
    stops, and a request that arrives meanwhile is closed unanswered (the gateway falls back)."""
    fake, server = replica
    channels, channel, [running, _] = await _held(replica, "running", "second")
    drain = asyncio.create_task(server.drain(5.0))
    await asyncio.sleep(0.1)
    assert not drain.done()  # jobs in flight
    fake.hold.set()
    assert [e["status"] async for e in running] == ["COMPLETED"]
    with pytest.raises(ChannelBroken):  # on a connection opened before the drain
        late = await channels.open(channel, "late", {}, b"", 0)
        await late.__anext__()
    await asyncio.wait_for(drain, 5)
    assert "late" not in fake.calls

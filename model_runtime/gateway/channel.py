"""The gateway's end of the direct channel to a model replica: a request and its events over one
TCP connection to the replica's own event loop, without Serve's router thread and the replica's
gRPC loop in between (model_runtime/replica/channel.py is the other end).

    channel = channels.usable(app_name, running_replica_ids)   # None: go through Serve
    stream = await channels.open(channel, job_id, envelope, blob, inline_max)
    first = await stream.__anext__()    # ChannelBroken: nothing was admitted, go through Serve

A channel (address, token, replica id) is learned by calling the replica's `channel()` through
Serve's handle, in the background and at most every `ASK_EVERY_S` per app, never on a request's
path. It is used only while Serve's details show exactly one RUNNING replica for the app and it
is the channel's (apps with several replicas keep Serve's routing). Connections are pooled, one
request at a time each; the replica queues and orders requests as it does for Serve's calls.

Fallback: a failed connect, or a connection that ends before the admission answer, forgets the
channel and raises `ChannelBroken` (the request then goes through Serve: nothing was admitted).
A connection that ends after admission ends the job with an ERROR, as a replica dying under Serve.

The NetworkPolicy of the chart lets Ray pods reach each other on every port, so the gateway (on
the head) reaches a worker's channel port as it reaches its Ray ports.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from model_runtime.channel_wire import FRAME_MARGIN_BYTES, TERMINAL, FrameError, read_frame, write_frame

log = logging.getLogger("ray.serve")

ASK_EVERY_S = 2.0  # an app's replica is asked for its channel at most this often
ASK_AGAIN_AFTER_FAILURE_S = 30.0  # after a failed ask (e.g. a replica image without `channel()`)
ASK_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 2.0
IDLE_PER_CHANNEL = 8  # idle connections kept per channel
GONE = "The model's replica went away while running the job; retry."


class ChannelBroken(Exception):
    """The channel failed before the replica admitted the request: send it through Serve."""


@dataclass
class Channel:
    app: str
    host: str
    port: int
    token: bytes
    replica_id: str
    max_frame: int  # the cap of an event frame: the replica's max_result_bytes plus a margin
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


def channel_of(app_name: str, info: Any) -> Channel:
    """A `Channel` from the answer of `ModelReplica.channel()`; ValueError when it is not one."""
    try:
        return Channel(app_name, str(info["host"]), int(info["port"]), bytes(info["token"]), str(info["replica_id"]),
                       int(info["max_result_bytes"]) + FRAME_MARGIN_BYTES)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a channel answer: {exc!r}") from None


class ChannelStream:
    """One request's events from a channel connection: the handle stream's interface (`async for`,
    `cancel()`). The connection goes back to its channel's pool with the terminal event."""

    def __init__(self, channels: Channels, channel: Channel,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._channels, self._channel, self._reader, self._writer = channels, channel, reader, writer
        self._admitted = False
        self._over = False

    def __aiter__(self) -> ChannelStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._over:
            raise StopAsyncIteration
        try:
            event = await read_frame(self._reader, self._channel.max_frame)
            if not (isinstance(event, dict) and isinstance(event.get("status"), str)):
                raise FrameError("a frame that is not an event")
        except (OSError, asyncio.IncompleteReadError, FrameError) as exc:
            self.cancel()
            if not self._admitted:
                self._channels.forget(self._channel.app)
                raise ChannelBroken(f"{type(exc).__name__}: {exc}") from None
            log.warning("direct channel to %s broke during a job: %r", self._channel.app, exc)
            return {"status": "ERROR", "description": GONE}
        self._admitted = True
        if isinstance(limit := (event.get("limits") or {}).get("max_result_bytes"), int):
            self._channel.max_frame = limit + FRAME_MARGIN_BYTES  # the model's limits change in place
        if event["status"] in TERMINAL:  # the request's last event: the connection takes the next one
            self._over = True
            self._channels.give_back(self._channel, self._reader, self._writer)
        return event

    def release(self) -> None:
        """The job is over for the gateway: a connection still mid-request is closed (the replica
        then closes the request's generator); one past its terminal event is already pooled."""
        if not self._over:
            self.cancel()

    def cancel(self) -> None:
        """Close the connection: the replica closes the request's generator (a waiting job leaves its queue)."""
        self._over = True
        self._writer.close()


class Channels:
    """The known channels by app, their pools of idle connections, and the asks in flight."""

    def __init__(self, enabled: bool, ask: Callable[[str], Any]) -> None:
        """`ask(app_name)`: the awaitable answer of the app's `channel()` through Serve's handle."""
        self.enabled, self._ask = enabled, ask
        self._known: dict[str, Channel] = {}
        self._asked: dict[str, float] = {}  # app → when its replica was last asked (monotonic)
        self._asking: set[asyncio.Task[None]] = set()
        self.counts: Counter[str] = Counter()  # "channel" / "serve" / "fallback": requests by path

    def usable(self, app_name: str, running: frozenset[str] | None) -> Channel | None:
        """The app's channel if its one RUNNING replica is the channel's; else None, and the
        replica is asked for its channel in the background when the app has one replica."""
        if not self.enabled or not running or len(running) != 1:
            return None
        channel = self._known.get(app_name)
        if channel is not None and channel.replica_id in running:
            return channel
        if channel is not None:  # a replaced replica: its channel is gone with it
            self.forget(app_name)
        self._learn(app_name)
        return None

    def _learn(self, app_name: str) -> None:
        now = time.monotonic()
        if now - self._asked.get(app_name, -ASK_EVERY_S) < ASK_EVERY_S:
            return
        self._asked[app_name] = now
        task = asyncio.create_task(self._ask_channel(app_name))
        self._asking.add(task)
        task.add_done_callback(self._asking.discard)

    async def _ask_channel(self, app_name: str) -> None:
        try:
            async with asyncio.timeout(ASK_TIMEOUT_S):
                info = await self._ask(app_name)
            channel = channel_of(app_name, info)
        except Exception as exc:  # an app without `channel()` (older image) or gone: Serve's path
            log.info("no direct channel to %s: %r", app_name, exc)
            self._asked[app_name] = time.monotonic() + ASK_AGAIN_AFTER_FAILURE_S - ASK_EVERY_S
            return
        old = self._known.get(app_name)
        if old is not None:
            old.close()
        self._known[app_name] = channel
        log.info("direct channel to %s: replica %s at %s:%d", app_name, channel.replica_id, channel.host,
                 channel.port)

    def forget(self, app_name: str) -> None:
        channel = self._known.pop(app_name, None)
        if channel is not None:
            channel.close()

    def forget_except(self, apps: set[str]) -> None:
        """Drop the channels of apps no longer routed to."""
        for app_name in [a for a in self._known if a not in apps]:
            self.forget(app_name)

    async def open(self, channel: Channel, job_id: str, envelope: dict[str, Any], blob: bytes,
                   inline_max: int) -> ChannelStream:
        """Send a request on an idle connection (or a new one); ChannelBroken if none can be had."""
        reader, writer = await self._connection(channel)
        stream = ChannelStream(self, channel, reader, writer)
        try:
            write_frame(writer, {"job_id": job_id, "envelope": envelope, "blob": blob, "inline_max": inline_max})
            await writer.drain()
        except (OSError, RuntimeError) as exc:  # uvloop raises RuntimeError on a transport closed meanwhile
            stream.cancel()
            self.forget(channel.app)
            raise ChannelBroken(f"{type(exc).__name__}: {exc}") from None
        return stream

    async def _connection(self, channel: Channel) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while channel.idle:
            reader, writer = channel.idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer
            writer.close()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(channel.host, channel.port)
        except (OSError, TimeoutError) as exc:
            self.forget(channel.app)
            raise ChannelBroken(f"connect to {channel.host}:{channel.port}: {exc!r}") from None
        writer.write(channel.token)
        return reader, writer

    def give_back(self, channel: Channel, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._known.get(channel.app) is channel and len(channel.idle) < IDLE_PER_CHANNEL:
            channel.idle.append((reader, writer))
        else:
            writer.close()

    def close(self) -> None:
        for task in list(self._asking):
            task.cancel()
        for app_name in list(self._known):
            self.forget(app_name)


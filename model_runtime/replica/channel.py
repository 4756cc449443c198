"""The replica's end of the direct channel: a TCP server on the replica's own event loop that runs
each request through the same `execute` generator as a DeploymentHandle call.

    server = ChannelServer(replica.execute, max_request_bytes, replica_id)
    await server.start(host)        # on the loop `execute` runs on; port 0
    server.info()                   # {"host", "port", "token", "replica_id"}: handed out through Serve

The gateway learns `info()` through Serve's handle (`ModelReplica.channel`), so the token reaches
only who may call the replica through Serve; a connection that does not send it first is closed
before anything else is read. Frames are msgpack (model_runtime/channel_wire.py), never pickle.

Each request is `execute(job_id, envelope, blob, inline_max, chunk_bytes=0)`: admission, the
queue, the lock, levels and metrics are the handle path's own. The gateway sends nothing while a
request's events stream, so anything read then (the peer closing, above all) ends the request:
the generator is closed, and a job still waiting leaves the queue as on Serve's cancel.

Sockets stay allowed on the replica's non-request threads (model_runtime/sandbox/process_filter.py);
request threads, where users' code runs, have no sockets at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from model_runtime.channel_wire import TERMINAL, TOKEN_BYTES, FrameError, read_frame, write_frame

log = logging.getLogger("ray.serve")

HANDSHAKE_TIMEOUT_S = 10.0  # a connection has this long to send the token

Execute = Callable[[str, dict[str, Any], bytes, int, int], AsyncIterator[dict[str, Any]]]


def _request(frame: Any) -> tuple[str, dict[str, Any], bytes, int] | None:
    """The request in a frame, or None when it is not one (the connection is then closed)."""
    if not isinstance(frame, dict):
        return None
    job_id, envelope, blob, inline_max = (frame.get(k) for k in ("job_id", "envelope", "blob", "inline_max"))
    if not (isinstance(job_id, str) and isinstance(envelope, dict) and isinstance(blob, bytes)
            and isinstance(inline_max, int)):
        return None
    return job_id, envelope, blob, inline_max


class ChannelServer:
    def __init__(self, execute: Execute, max_request_bytes: Callable[[], int], replica_id: str) -> None:
        """`max_request_bytes`: the cap of a request frame, read per frame (limits change in place)."""
        self._execute, self._max_request_bytes, self.replica_id = execute, max_request_bytes, replica_id
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self._server: asyncio.Server | None = None
        self.host, self.port = "", 0
        self.refused = 0  # connections closed for a wrong token or a bad frame
        self._writers: set[asyncio.StreamWriter] = set()  # the open connections
        self._active = 0  # requests whose events are being written
        self._draining = False

    async def start(self, host: str) -> None:
        self._server = await asyncio.start_server(self._connection, host, 0)
        self.host, self.port = host, int(self._server.sockets[0].getsockname()[1])
        log.info("direct channel of replica %s listening on %s:%d", self.replica_id, self.host, self.port)

    def info(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "token": self.token, "replica_id": self.replica_id}

    async def drain(self, timeout_s: float) -> None:
        """The replica is stopping: take no more requests and wait, at most `timeout_s`, for those
        in flight (Serve's own drain counts only handle calls), then close every connection. A
        request that arrives meanwhile is closed unanswered: the gateway sends it through Serve."""
        self._draining = True
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._active and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self.close()

    def close(self) -> None:
        """Stop listening and close every connection (the gateway sees the replica gone)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # This loop keeps reading: the peer closing is seen at once and cancels the request in
        # flight. A request frame may come only once the one before has sent its terminal event.
        current: _Request | None = None
        self._writers.add(writer)
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                token = await reader.readexactly(TOKEN_BYTES)
            if not hmac.compare_digest(token, self.token):
                self.refused += 1
                log.warning("direct channel: a connection with a wrong token was closed")
                return
            while True:
                request = _request(await read_frame(reader, self._max_request_bytes()))
                if request is None or (current is not None and not current.ended):
                    self.refused += 1
                    log.warning("direct channel: not a request, or one out of turn; connection closed")
                    return
                if current is not None:
                    await current.task  # its generator is past its terminal event: a moment
                if self._draining:
                    return  # unanswered: the gateway sends it through Serve
                current = _Request(self._execute(*request, 0), writer)
                self._active += 1
                current.task.add_done_callback(self._ended)
        except FrameError as exc:
            self.refused += 1
            log.warning("direct channel: %s; connection closed", exc)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass  # the peer left (or never spoke)
        finally:
            if current is not None and not current.task.done():
                current.task.cancel()  # the peer left mid-request: the generator is closed
                with contextlib.suppress(BaseException):
                    await current.task
            self._writers.discard(writer)
            writer.close()


    def _ended(self, _: asyncio.Task[None]) -> None:
        self._active -= 1


class _Request:
    """One request's events, written as frames by a task of its own."""

    def __init__(self, events: AsyncIterator[dict[str, Any]], writer: asyncio.StreamWriter) -> None:
        self.ended = False  # its terminal event is written
        self.task = asyncio.create_task(self._pump(events, writer))

    async def _pump(self, events: AsyncIterator[dict[str, Any]], writer: asyncio.StreamWriter) -> None:
        try:
            async for event in events:
                if self.ended:
                    continue  # nothing follows a terminal event (execute yields none)
                write_frame(writer, event)
                self.ended = event.get("status") in TERMINAL
                await writer.drain()
            if not self.ended:
                write_frame(writer, {"status": "ERROR", "description": "The model ended the job without a result."})
                self.ended = True
                await writer.drain()
        except ConnectionError:
            pass  # the connection loop sees the peer gone and closes
        except Exception as exc:  # the server's fault (execute answers a request's own faults itself)
            log.exception("direct channel: a request failed in the replica")
            if not self.ended:
                self.ended = True
                write_frame(writer, {"status": "ERROR", "description": f"The server failed to run the job: {exc}"})
        finally:
            if isinstance(events, AsyncGenerator):
                await events.aclose()

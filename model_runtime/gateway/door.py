"""The gateway's own listener: users' HTTP and websocket traffic straight into the gateway replica.

Through Serve's proxy every request crosses one more process and its Ray calls (the websocket
open, the body read back from the proxy, each frame out). The door serves the same ASGI app (the
FastAPI app whose routes Serve bound to this replica) with uvicorn on the replica's own event
loop, on a fixed, configured port (`GatewayAppArgs.direct_port`): the nnsight client's
`/subscribe`, `POST /request`, `GET /response/{id}` and result downloads reach the gateway with no
hop. Serve's proxy keeps serving the same routes on its own port (KubeRay's health checks and
Service point there).

Replacement. The socket is bound with SO_REUSEPORT, so a new gateway replica binds the same port
while the old one still listens. Once the new one listens it takes the door: it writes its replica
id under the door's key (node and port) in Ray's internal KV store and sends the previous owner a
notice (a datagram to the abstract Unix socket named after the key and that owner: replicas that
share a port share a network namespace). A listening replica reads the key when a notice comes (a
forged one costs one read) and otherwise every `WATCH_S`; seeing another owner, it closes its
listening socket; its open websockets and in-flight requests go on. Serve stops the old replica
while it starts the new one, so a stopping replica (`close()`) keeps listening until a successor
has taken the door (at most `SUCCESSOR_WAIT_S`: the port is never left without a listener), then
waits for its unfinished jobs and shuts the server down, all within `CLOSE_S`. Between the new
replica listening and the old one noticing, the kernel spreads new connections over both: a
websocket opened on one and its `POST /request` sent to the other gets "Unknown session id" (each
replica keeps its sessions in memory). With the notice that window is one KV read and put
(milliseconds); where abstract sockets do not exist (not Linux) or a notice is lost, it is at
most `WATCH_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import uvicorn

log = logging.getLogger("ray.serve")

KV_NAMESPACE = "ndif-gateway-door"
WATCH_S = 2.0  # how often a listening replica reads the door's key when no notice came
NOTICE_GAP_S = 0.1  # the least time between two reads of the key that notices caused
# A stopping replica's budget (Serve's graceful shutdown gives a replica 20 s, and spends about 2 s
# draining what came through its proxy before it calls the replica's destructor): first wait for a
# successor to listen (a gateway replica starts in a few seconds), then for unfinished jobs.
SUCCESSOR_WAIT_S = 10.0
CLOSE_S = 16.0
KEEP_ALIVE_S = 90.0  # idle keep-alive connections (the client reuses one per session)


class _Server(uvicorn.Server):
    # A replica's event loop is not the process's signal owner: Serve and Ray handle signals.
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def door_key(node_id: str, port: int) -> bytes:
    return f"{node_id}:{port}".encode()


def notice_address(key: bytes, owner: str) -> str:
    """The abstract Unix socket where the door's owner `owner` hears that another replica took it
    (a digest: abstract names are at most 107 bytes)."""
    return "\0ndif-gateway-door-" + hashlib.sha256(key + b"\0" + owner.encode()).hexdigest()[:40]


def _notice_socket(key: bytes, owner: str) -> socket.socket | None:
    """This owner's notice socket, bound; None where abstract Unix sockets do not exist."""
    family = getattr(socket, "AF_UNIX", None)
    if family is None:
        return None
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind(notice_address(key, owner))
    except OSError:
        sock.close()
        return None
    return sock


def _notify(key: bytes, owner: str) -> None:
    """Tell the replica `owner` that the door is taken (best effort: it may be gone)."""
    family = getattr(socket, "AF_UNIX", None)
    if family is None:
        return
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.sendto(b"taken", notice_address(key, owner))


class Door:
    """One fixed-port listener for `app` in this replica; `open()` once, `close()` at shutdown."""

    def __init__(self, app: Any, host: str, port: int, *, owner: str, node_id: str,
                 loop: asyncio.AbstractEventLoop, busy: Callable[[], bool],
                 succeeded: Callable[[], Awaitable[bool]]) -> None:
        """`busy`: whether the replica has unfinished jobs. `succeeded`: whether a successor is coming
        at all (False when the application is being deleted: no wait for one)."""
        self.host, self.port, self.owner = host, port, owner
        self._app, self._loop, self._busy, self._succeeded = app, loop, busy, succeeded
        self._key = door_key(node_id, port)
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._listening = threading.Event()
        self._stopped = threading.Event()
        self._noticed_at = 0.0  # monotonic time of the last notice acted on

    def open(self) -> None:
        """Bind now (a port taken by something else fails the replica's start-up with the reason),
        then serve on the replica's loop. Callable from any thread; a second call does nothing."""
        if self._server is not None:
            return
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise RuntimeError(f"the gateway's direct port {self.host}:{self.port} is taken: {exc}") from exc
        config = uvicorn.Config(self._app, host=self.host, port=self.port, lifespan="off", access_log=False,
                                log_config=None, log_level=None, timeout_keep_alive=int(KEEP_ALIVE_S))
        self._server = _Server(config)
        self._loop.call_soon_threadsafe(self._start, sock)

    def _start(self, sock: socket.socket) -> None:
        assert self._server is not None
        self._task = self._loop.create_task(self._serve(self._server, sock))

    async def _serve(self, server: _Server, sock: socket.socket) -> None:
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():
            await asyncio.sleep(0.005)
        if server.started:
            self._listening.set()
            log.info("gateway door listening on %s:%d", self.host, self.port)
            threading.Thread(target=self._take_and_watch, name="gateway-door", daemon=True).start()
        await serving

    def _take_and_watch(self) -> None:
        from ray.experimental import internal_kv

        notices = _notice_socket(self._key, self.owner)
        try:
            previous = internal_kv._internal_kv_get(self._key, namespace=KV_NAMESPACE)
            internal_kv._internal_kv_put(self._key, self.owner.encode(), overwrite=True, namespace=KV_NAMESPACE)
            if previous is not None and previous.decode() != self.owner:
                _notify(self._key, previous.decode())
            while not self._stopped.is_set():
                self._wait_for_notice(notices)
                if self._stopped.is_set():
                    return
                current = internal_kv._internal_kv_get(self._key, namespace=KV_NAMESPACE)
                if current is not None and current.decode() != self.owner:
                    log.info("gateway door %d taken by replica %s: this replica stops listening",
                             self.port, current.decode())
                    self._loop.call_soon_threadsafe(self._stop_listening)
                    return
        except Exception as exc:  # the watch is best effort: Serve's stop still closes the listener
            log.warning("gateway door watch ended: %r", exc)
        finally:
            if notices is not None:
                notices.close()

    def _wait_for_notice(self, notices: socket.socket | None) -> None:
        """Until a notice comes or `WATCH_S` passes; a notice no sooner than `NOTICE_GAP_S` after
        the last one (a flood of datagrams costs at most one read of the key per gap)."""
        if notices is None:
            self._stopped.wait(WATCH_S)
            return
        notices.settimeout(WATCH_S)
        try:
            notices.recv(16)
        except TimeoutError:
            return
        self._stopped.wait(self._noticed_at + NOTICE_GAP_S - time.monotonic())
        self._noticed_at = time.monotonic()
        notices.setblocking(False)
        with contextlib.suppress(OSError):
            while notices.recv(16):  # the rest of a burst: one read answers them all
                pass

    def _stop_listening(self) -> None:
        """Close the listening socket only: accepted connections (websockets) keep being served."""
        self._stopped.set()
        if self._server is not None:
            for server in getattr(self._server, "servers", []):
                server.close()

    @property
    def listening(self) -> bool:
        return self._listening.is_set() and not self._stopped.is_set()

    async def close(self) -> None:
        """Listen until a successor took the door, stop listening, let unfinished jobs end, then end
        every connection (all within `CLOSE_S`)."""
        if self._server is None:
            return
        started = self._loop.time()
        if not self._stopped.is_set() and await self._succeeded():
            while not self._stopped.is_set() and self._loop.time() < started + SUCCESSOR_WAIT_S:
                await asyncio.sleep(0.05)
        self._stop_listening()
        while self._busy() and self._loop.time() < started + CLOSE_S:
            await asyncio.sleep(0.1)
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, timeout=3.0)
        self._release()

    def _release(self) -> None:
        """Drop the door's key if this replica still owns it (the next owner writes its own)."""
        try:
            from ray.experimental import internal_kv

            current = internal_kv._internal_kv_get(self._key, namespace=KV_NAMESPACE)
            if current is not None and current.decode() == self.owner:
                internal_kv._internal_kv_del(self._key, namespace=KV_NAMESPACE)
        except Exception as exc:
            log.info("gateway door key not released: %r", exc)

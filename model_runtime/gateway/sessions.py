"""The client's websocket sessions (`WS /subscribe`).

First frame `{"session_id": ...}`; then one frame per status of that session's jobs: JSON text, or
a binary `ResponseModel.pickle()` for an inline COMPLETED result. An idle session with a job in
flight repeats that job's status every `ws_keepalive_s` so proxies keep the connection.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import WebSocket, WebSocketDisconnect

from model_runtime.gateway.auth import ApiKeys
from model_runtime.gateway.jobs import JobStore
from ndif_operator.api.naming import API_KEY_HEADER


async def _send_frame(websocket: WebSocket, frame: str | bytes) -> None:
    if isinstance(frame, bytes):
        await websocket.send_bytes(frame)
    else:
        await websocket.send_text(frame)


class Sessions:
    def __init__(self, keys: ApiKeys, jobs: JobStore, keepalive_s: float) -> None:
        self._keys, self._jobs, self._keepalive_s = keys, jobs, keepalive_s

    async def subscribe(self, websocket: WebSocket) -> None:
        """Serves one session until the client goes away."""
        if self._keys.check(websocket.headers.get(API_KEY_HEADER)) is None:
            await websocket.close(code=1008, reason="Missing or invalid API key")
            return
        await websocket.accept()
        session_id, queue = self._jobs.open_session()
        await websocket.send_text(json.dumps({"session_id": session_id}))
        self._jobs.attach(session_id, lambda frame: _send_frame(websocket, frame))
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
                    self._jobs.sent(session_id)
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
            self._jobs.close_session(session_id)

    async def _keepalive(self, websocket: WebSocket, session_id: str) -> None:
        """Idle session with a job in flight: repeat its status so proxies and load balancers keep
        the connection (the client sends no pings of its own and has no receive timeout)."""
        now = time.monotonic()
        for job in self._jobs.active(session_id):
            if job.latest is not None and job.latest["status"] in ("QUEUED", "RUNNING"):
                waited = f"{job.latest['description']} ({now - job.created:.0f} s)"
                await websocket.send_text(json.dumps({**job.latest, "description": waited}))

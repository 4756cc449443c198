"""The door's ASGI app: the two routes of every blocking request, served without FastAPI's machinery.

`WS /subscribe` and `POST /request` go from uvicorn straight to the methods the gateway's routes
call (`Sessions.subscribe`, `RequestRunner.request`), wrapped in a Starlette `WebSocket` /
`Request` built on the ASGI scope. The checks are the methods' own (API
key, client version, the capped body read, the multipart form, routing), so the answers are those
of the FastAPI routes: a refusal (`HttpError`) is turned into its response by the FastAPI app's own
exception handler, and a success is the same JSON. Every other route goes to the FastAPI app, as
does everything that comes through Serve's proxy. What is skipped per request: FastAPI's middleware
stack, its routing, the per-request dependency that finds the replica (Serve's class-based view)
and its response encoding (about 0.25 ms of CPU per `POST /request` on a 2-core x86_64 box).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket

from model_runtime.gateway.bounds import HttpError

log = logging.getLogger("ray.serve")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class LeanIngress:
    def __init__(self, app: Any, request: Callable[[Request], Awaitable[dict[str, Any]]],
                 subscribe: Callable[[WebSocket], Awaitable[None]]) -> None:
        """`app`: the FastAPI app (its routes bound to the same replica); `request` and `subscribe`:
        what the gateway's two routes call (`RequestRunner.request`, `Sessions.subscribe`)."""
        self._app, self._request_route, self._subscribe = app, request, subscribe
        self._on_error: Callable[[Request, HttpError], Awaitable[Response]] = app.exception_handlers[HttpError]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind, path = scope["type"], scope.get("path")
        if kind == "http" and path == "/request" and scope.get("method") == "POST":
            await self._request(scope, receive, send)
        elif kind == "websocket" and path == "/subscribe":
            await self._subscribe(WebSocket(scope, receive, send))
        else:
            await self._app(scope, receive, send)

    async def _request(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            body = json.dumps(await self._request_route(request), ensure_ascii=False, allow_nan=False,
                              separators=(",", ":")).encode()
            response: Response = Response(body, media_type="application/json")
        except HttpError as exc:
            response = await self._on_error(request, exc)
        except Exception:
            log.exception("POST /request failed in the gateway")
            response = JSONResponse({"detail": "Internal Server Error"}, status_code=500)
        await response(scope, receive, send)

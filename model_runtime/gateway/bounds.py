"""What the gateway accepts and keeps, bounded: request bodies as they stream in, job records.

A body is counted while it arrives, chunked transfer included, and refused the moment it passes
the limit: a `Content-Length` is the sender's claim, and a chunked body has none. A job record
(the latest status, kept for `/response/{id}` polls for an hour) keeps at most
`MAX_DESCRIPTION_CHARS` of description and `MAX_META_CHARS` of metadata.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from model_runtime.bounds import bounded

MAX_DESCRIPTION_CHARS = 16 * 1024
MAX_META_CHARS = 16 * 1024


class HttpError(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


async def read_body_capped(request: Request, max_bytes: int) -> None:
    """Read the body, refusing it (413) as soon as it passes `max_bytes`; later reads reuse it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    request._body = bytes(body)  # Starlette's form parser reads a body already read from here


def _too_large(max_bytes: int) -> HttpError:
    return HttpError(413, f"Request body exceeds the gateway's limit of {max_bytes} bytes.")


def bounded_event(event: dict[str, Any]) -> dict[str, Any]:
    """A status event with its description and meta cut to what a job record may keep."""
    description = event.get("description")
    meta = event.get("meta")
    too_long = isinstance(description, str) and len(description) > MAX_DESCRIPTION_CHARS
    meta_too_big = meta is not None and len(json.dumps(meta, default=str)) > MAX_META_CHARS
    if not (too_long or meta_too_big):
        return event
    event = dict(event)
    if too_long and isinstance(description, str):
        event["description"] = bounded(description, MAX_DESCRIPTION_CHARS)
    if meta_too_big:
        event["meta"] = {"note": f"meta dropped: over {MAX_META_CHARS} characters"}
    return event

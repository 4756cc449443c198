"""How a request and its events cross between the gateway and a model replica (a DeploymentHandle call).

    options, chunk_bytes = call_options(len(blob))
    handle.options(method_name="execute", stream=True, **options).remote(..., chunk_bytes)
    # replica: for piece in split(event, chunk_bytes): yield piece; then yield event
    # gateway: CHUNK events are collected, then join(event, pieces) on the final one

A request whose payload is at most `BY_VALUE_MAX_BYTES` goes by value over Serve's gRPC transport
between replicas (`_by_reference=False`, plain pickle both ways): one gRPC stream per request from
the gateway straight to the replica's inter-deployment server, instead of a Ray actor task whose
streamed items each go through Ray's object layer. Measured on loopback it shortens the hop in,
the admission answer and the result hop (docs/runtime.md). A larger payload goes by reference
(Ray's actor call and object store), as every call did before.

A gRPC message is capped (Serve's `RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH`, 4 MiB by default),
so on that transport a result or result frame larger than `chunk_bytes` comes back as CHUNK
events (`{"status": "CHUNK", "data": <bytes>}`) right before its final event, which names the field
they make up (`"chunked": "frame" | "result"`). Neither the client nor the job's status sees them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

MIB = 1024 * 1024
BY_VALUE_MAX_BYTES = 1 * MIB  # a payload at most this big goes by value (gRPC)
CHUNK_BYTES = 1 * MIB  # the largest bytes field of one event on the gRPC transport
CHUNK = "CHUNK"
_CHUNKED_FIELDS = ("frame", "result")


def call_options(payload_bytes: int) -> tuple[dict[str, Any], int]:
    """The handle options for a request of this size, and the chunk size its events must keep to
    (0: no limit, the by-reference transport)."""
    if payload_bytes > BY_VALUE_MAX_BYTES:
        return {}, 0
    return {"_by_reference": False, "request_serialization": "pickle", "response_serialization": "pickle"}, CHUNK_BYTES


def split(event: dict[str, Any], chunk_bytes: int) -> Iterator[dict[str, Any]]:
    """CHUNK events for the one large bytes field of `event` (if any is over `chunk_bytes`), which is
    then replaced by `"chunked": <field>`. Nothing when `chunk_bytes` is 0."""
    if not chunk_bytes:
        return
    for name in _CHUNKED_FIELDS:
        data = event.get(name)
        if isinstance(data, bytes) and len(data) > chunk_bytes:
            del event[name]
            event["chunked"] = name
            view = memoryview(data)
            for start in range(0, len(data), chunk_bytes):
                yield {"status": CHUNK, "data": bytes(view[start:start + chunk_bytes])}
            return


def join(event: dict[str, Any], pieces: list[bytes]) -> dict[str, Any]:
    """`event` with its chunked field put back together from the CHUNK events before it."""
    name = event.pop("chunked", None)
    if name in _CHUNKED_FIELDS:
        event[name] = b"".join(pieces)
    pieces.clear()
    return event

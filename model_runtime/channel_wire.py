"""The framing of the direct channel between the gateway and a model replica (no torch, no Ray).

    connection: the gateway sends the channel's token (TOKEN_BYTES raw bytes) once, then, one
                request at a time: a request frame, answered by event frames up to a terminal one
    frame:      a 4-byte big-endian length, then that many bytes of msgpack

A request frame is `{"job_id": str, "envelope": dict, "blob": bytes, "inline_max": int}`; an
event frame is one event of `ModelReplica.execute` (a dict of str, numbers, bytes, lists and
dicts). Each request's events end with exactly one terminal event (`TERMINAL`: COMPLETED, or
ERROR, which a refusal is too); the connection then takes the next request.

msgpack, not pickle: a replica runs users' code, so what it sends the gateway (which holds API
keys) must be data that decoding cannot turn into code. Each reader caps the length it accepts
and closes the connection on a longer frame before reading its body.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgpack

TOKEN_BYTES = 32
HEADER = struct.Struct(">I")
TERMINAL = frozenset({"COMPLETED", "ERROR"})  # the statuses that end a request's events
# What a frame may add to its largest bytes field (envelope, meta, timings, report, the frame's
# torch.save wrapper): a reader's cap is the bytes field's limit plus this.
FRAME_MARGIN_BYTES = 1024 * 1024


class FrameError(Exception):
    """A frame over the reader's cap, or one that is not msgpack: the connection must be closed."""


def encode(obj: Any) -> list[bytes]:
    """The frame of `obj` as the pieces to write (header, body): no copy of a large body.
    A value msgpack cannot carry (a stray non-builtin in a result's meta) goes as its str."""
    body = msgpack.packb(obj, use_bin_type=True, default=str)
    return [HEADER.pack(len(body)), body]


def write_frame(writer: asyncio.StreamWriter, obj: Any) -> None:
    writer.writelines(encode(obj))


async def read_frame(reader: asyncio.StreamReader, max_bytes: int) -> Any:
    """The next frame's object. Raises `FrameError` for a frame over `max_bytes` (its body is not
    read) or one that does not decode, `asyncio.IncompleteReadError` when the peer closed."""
    (length,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    if length > max_bytes:
        raise FrameError(f"a frame of {length} bytes is over this reader's cap of {max_bytes} bytes")
    body = await reader.readexactly(length)
    try:
        return msgpack.unpackb(body, raw=False)
    except Exception as exc:  # msgpack's own errors, or ValueError for trailing data
        raise FrameError(f"a frame that is not msgpack: {type(exc).__name__}") from None

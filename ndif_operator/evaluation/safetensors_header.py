"""Read safetensors headers without reading tensors.

A safetensors file starts with an 8-byte little-endian header length N, then N bytes of JSON:
`{tensor name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}`. Only those 8 + N bytes
are ever read, whatever the size of the file (a few KiB to a few MiB for the largest models).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

# Bytes per element of each safetensors dtype.
DTYPE_SIZES: dict[str, float] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F6_E2M3": 0.75, "F6_E3M2": 0.75, "F4": 0.5,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
# Dtypes a requested torch dtype converts (HF loaders cast floating weights, never integer/packed ones).
CONVERTIBLE = frozenset({"F64", "F32", "F16", "BF16"})
# A header larger than this is not a real checkpoint (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
FIRST_READ_BYTES = 64 * 1024  # one ranged GET usually brings the whole header


class HeaderError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: str
    numel: int

    @property
    def nbytes(self) -> int:
        return math.ceil(self.numel * DTYPE_SIZES[self.dtype])


def header_length(prefix: bytes) -> int:
    """The JSON header length from a file's first 8 bytes."""
    if len(prefix) < 8:
        raise HeaderError("file shorter than a safetensors header")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length <= 1 or length > MAX_HEADER_BYTES:
        raise HeaderError(f"implausible safetensors header length {length}")
    return int(length)


def parse_header(raw: bytes) -> list[TensorInfo]:
    """Parse the JSON header bytes (without the 8-byte length) into tensors, sorted by name."""
    try:
        body: dict[str, Any] = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeaderError(f"safetensors header is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise HeaderError("safetensors header is not a JSON object")
    tensors = []
    for name, info in sorted(body.items()):
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], info["shape"]
        except (KeyError, TypeError) as exc:
            raise HeaderError(f"tensor {name!r} lacks dtype or shape") from exc
        if dtype not in DTYPE_SIZES:
            raise HeaderError(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise HeaderError(f"tensor {name!r} has a bad shape {shape!r}")
        tensors.append(TensorInfo(name=name, dtype=dtype, numel=math.prod(shape)))
    return tensors

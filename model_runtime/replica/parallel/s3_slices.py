"""Each tensor-parallel rank reads its own slices of an S3 checkpoint by byte ranges.

    index = stage_s3_index(bucket, prefix, endpoint_url=..., region=...)  # rank 0, once per node
    remote = RemoteCheckpoint.find(index)        # every rank, inside `shard_loading.load_shard`
    remote.open(path)                            # a safetensors file handle read by ranged GETs

A single-device replica downloads the whole prefix. A rank of a k-way replica needs only 1/k of
each sharded tensor plus the replicated ones, so for S3 sources the node's staging directory
(the *index*) holds only the small files (config, tokenizer, the safetensors index) and, in place
of each `*.safetensors` object, an empty stub listed in a manifest. When transformers opens a
stub, the rank reads the file's header with two ranged GETs (its 8-byte length, then the JSON)
and, for each slice transformers asks of a tensor, GETs exactly the byte runs of that slice
(one run per contiguous stretch, e.g. one per row of a column-split matrix, fetched in
parallel). Nothing else of the object is transferred; the bytes are counted per rank.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "ndif-s3-safetensors.json"
_SUFFIX = ".safetensors"
_PARALLEL_GETS = 8
# safetensors dtype names → torch dtype attribute names
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
           "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def s3_client(endpoint_url: str | None, region: str | None) -> Any:
    """A boto3 S3 client with the replica's credentials (files or environment, read once:
    model_runtime/credentials.py)."""
    import boto3

    from model_runtime import credentials

    taken = credentials.current()
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region or taken.region(), **taken.s3())


def s3_objects(client: Any, bucket: str, prefix: str) -> Iterator[tuple[str, str, int]]:
    """(key, path relative to the prefix, size) of every object under `bucket/prefix`."""
    stripped = prefix.strip("/")
    listing_prefix = f"{stripped}/" if stripped else ""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=listing_prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(listing_prefix):]
            if rel and not rel.endswith("/"):
                yield obj["Key"], rel, int(obj["Size"])


def stage_s3_index(bucket: str, prefix: str, *, endpoint_url: str | None, region: str | None) -> Path:
    """The node's staging directory for a sharded load: small files downloaded, safetensors stubbed."""
    from model_runtime.replica.loading import s3_cache_root

    target = s3_cache_root() / bucket / f"{prefix.strip('/')}@ranges"
    client = s3_client(endpoint_url, region)
    remote: dict[str, dict[str, Any]] = {}
    for key, rel, size in s3_objects(client, bucket, prefix):
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(_SUFFIX):
            remote[rel] = {"key": key, "size": size}
            dest.touch()  # transformers finds the file; `RemoteCheckpoint.open` reads it from S3
        elif not (dest.exists() and dest.stat().st_size == size):
            partial = dest.with_name(f".{dest.name}.{os.getpid()}.part")
            client.download_file(bucket, key, str(partial))
            partial.replace(dest)
    if not remote:
        raise FileNotFoundError(f"no *.safetensors objects under s3://{bucket}/{prefix.strip('/')}/")
    manifest = {"bucket": bucket, "endpoint_url": endpoint_url, "region": region, "files": remote}
    (target / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return target


@dataclass
class RemoteCheckpoint:
    """The safetensors objects behind a staged index, and the bytes this process fetched of them."""

    root: Path
    bucket: str
    files: dict[str, dict[str, Any]]
    client: Any
    fetched: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def find(cls, checkpoint: str) -> RemoteCheckpoint | None:
        """The remote checkpoint when `checkpoint` is a staged S3 index, else None."""
        manifest = Path(checkpoint) / MANIFEST
        if not manifest.is_file():
            return None
        spec = json.loads(manifest.read_text())
        client = s3_client(spec["endpoint_url"], spec["region"])
        return cls(root=Path(checkpoint), bucket=spec["bucket"], files=spec["files"], client=client)

    def covers(self, path: Any) -> bool:
        return self._rel(path) in self.files

    def _rel(self, path: Any) -> str:
        try:
            return Path(os.fspath(path)).resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return ""

    def open(self, path: Any) -> RemoteSafetensors:
        return RemoteSafetensors(self, self.files[self._rel(path)]["key"])

    def get(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of object `key` (one ranged GET), counted."""
        body = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}")["Body"]
        data = bytes(body.read())
        if len(data) != end - start:
            raise OSError(f"s3://{self.bucket}/{key}: asked bytes {start}-{end - 1}, got {len(data)} bytes")
        with self._lock:
            self.fetched += len(data)
        return data


class RemoteSafetensors:
    """What transformers uses of a `safe_open` handle (keys, metadata, get_slice), over S3."""

    def __init__(self, checkpoint: RemoteCheckpoint, key: str) -> None:
        self._checkpoint, self._key = checkpoint, key
        length = int.from_bytes(checkpoint.get(key, 0, 8), "little")
        header = json.loads(checkpoint.get(key, 8, 8 + length))
        self._metadata = header.pop("__metadata__", None) or {}
        self._tensors: dict[str, dict[str, Any]] = header
        self._data_start = 8 + length

    def keys(self) -> list[str]:
        return list(self._tensors)

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def get_slice(self, name: str) -> RemoteSlice:
        return RemoteSlice(self, name, self._tensors[name])

    def get_tensor(self, name: str) -> Any:
        return self.get_slice(name)[...]

    def fetch(self, runs: list[tuple[int, int]]) -> bytes:
        """The byte runs (offsets within the data section) concatenated, fetched in parallel."""
        key, base = self._key, self._data_start
        if len(runs) == 1:
            return self._checkpoint.get(key, base + runs[0][0], base + runs[0][1])
        with ThreadPoolExecutor(_PARALLEL_GETS) as pool:
            return b"".join(pool.map(lambda run: self._checkpoint.get(key, base + run[0], base + run[1]), runs))

    def __enter__(self) -> RemoteSafetensors:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class RemoteSlice:
    """One tensor of a remote file; indexing it GETs only the bytes of the asked region."""

    def __init__(self, file: RemoteSafetensors, name: str, info: dict[str, Any]) -> None:
        self._file, self._name = file, name
        self._dtype: str = info["dtype"]
        self._shape: list[int] = list(info["shape"])
        self._offset = int(info["data_offsets"][0])

    def get_shape(self) -> list[int]:
        return list(self._shape)

    def get_dtype(self) -> str:
        return self._dtype

    def __getitem__(self, index: Any) -> Any:
        import torch

        dtype = getattr(torch, _DTYPES[self._dtype])
        itemsize = torch.empty((), dtype=dtype).element_size()
        bounds, kept = region(index, self._shape)
        shape = [stop - start for start, stop in bounds]
        if math.prod(shape) == 0:
            return torch.empty([shape[d] for d in kept], dtype=dtype)
        start = self._offset
        runs = [(start + a * itemsize, start + b * itemsize) for a, b in element_runs(bounds, self._shape)]
        data = bytearray(self._file.fetch(runs))
        return torch.frombuffer(data, dtype=dtype).reshape([shape[d] for d in kept])


def region(index: Any, shape: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """Per-dim [start, stop) bounds of a basic index (slices with step 1, ints, one Ellipsis), and
    the dims the result keeps (an int index drops its dim)."""
    items = list(index) if isinstance(index, tuple) else [index]
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (len(shape) - len(items) + 1)
    items += [slice(None)] * (len(shape) - len(items))
    if len(items) != len(shape):
        raise IndexError(f"index {index!r} has more dims than shape {shape}")
    bounds: list[tuple[int, int]] = []
    kept: list[int] = []
    for dim, (item, size) in enumerate(zip(items, shape, strict=True)):
        if isinstance(item, slice):
            start, stop, step = item.indices(size)
            if step != 1:
                raise NotImplementedError(f"strided slices are not read by ranges: {index!r}")
            bounds.append((start, max(start, stop)))
            kept.append(dim)
        else:
            i = int(item) + (size if int(item) < 0 else 0)
            bounds.append((i, i + 1))
    return bounds, kept


def element_runs(bounds: list[tuple[int, int]], shape: list[int]) -> list[tuple[int, int]]:
    """The region's contiguous [start, end) element runs in row-major order, adjacent ones merged."""
    if not shape:
        return [(0, 1)]
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    # The innermost dims the region spans whole are contiguous with the first partial one above them.
    inner = len(shape) - 1
    while inner > 0 and bounds[inner] == (0, shape[inner]):
        inner -= 1
    length = (bounds[inner][1] - bounds[inner][0]) * strides[inner]
    runs: list[tuple[int, int]] = []
    for outer in itertools.product(*(range(a, b) for a, b in bounds[:inner])):
        start = sum(i * s for i, s in zip(outer, strides, strict=False)) + bounds[inner][0] * strides[inner]
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], start + length)
        else:
            runs.append((start, start + length))
    return runs

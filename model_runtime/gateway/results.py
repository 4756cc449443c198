"""Where a finished job's result blob goes when it is not sent inline.

With an object store bucket configured: S3 (boto3), key `results/<job id>.pt`, presigned GET
valid one hour (the client downloads without credentials). Without one: the gateway keeps it in
memory (bounded) and serves it at `/result/<token>`, the token being unguessable.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from typing import Any

from model_runtime import credentials
from model_runtime.metrics import gateway_metrics

PRESIGN_SECONDS = 3600


class S3Results:
    def __init__(self, bucket: str, endpoint_url: str | None) -> None:
        import boto3

        self.bucket = bucket
        # Read as files (a mounted Secret) or taken out of the environment: model_runtime/credentials.py.
        taken = credentials.current()
        self._client = boto3.client("s3", endpoint_url=endpoint_url, region_name=taken.region(), **taken.s3())
        self._bucket_ready = False

    def _put_sync(self, job_id: str, blob: bytes) -> str:
        if not self._bucket_ready:
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except Exception:
                self._client.create_bucket(Bucket=self.bucket)
            self._bucket_ready = True
        key = f"results/{job_id}.pt"
        self._client.put_object(Bucket=self.bucket, Key=key, Body=blob)
        url: str = self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=PRESIGN_SECONDS
        )
        return url

    async def put(self, job_id: str, blob: bytes, base_url: str) -> str:
        try:
            return await asyncio.to_thread(self._put_sync, job_id, blob)
        except Exception:
            gateway_metrics().result_store_failure("s3")
            raise


class MemoryResults:
    """Results held by the gateway; oldest dropped beyond `max_bytes` or after an hour."""

    def __init__(self, max_bytes: int = 2 * 1024**3) -> None:
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._max_bytes = max_bytes
        self._bytes = 0

    async def put(self, job_id: str, blob: bytes, base_url: str) -> str:
        token = secrets.token_urlsafe(24)
        self._items[token] = (time.monotonic(), blob)
        self._bytes += len(blob)
        cutoff = time.monotonic() - PRESIGN_SECONDS
        while self._items and (self._bytes > self._max_bytes or next(iter(self._items.values()))[0] < cutoff):
            _, (_, old) = self._items.popitem(last=False)
            self._bytes -= len(old)
        return f"{base_url.rstrip('/')}/result/{token}"

    def get(self, token: str) -> bytes | None:
        item = self._items.get(token)
        return None if item is None else item[1]


def result_store(bucket: str | None, endpoint_url: str | None) -> Any:
    return S3Results(bucket, endpoint_url) if bucket else MemoryResults()

"""Bounded outputs and inputs (no Ray): error text, logs, job records and count, streamed bodies."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.requests import Request

from model_runtime.bounds import MAX_ERROR_CHARS, CappedLog, bounded
from model_runtime.gateway.bounds import MAX_DESCRIPTION_CHARS, HttpError, bounded_event, read_body_capped
from model_runtime.gateway.jobs import JobStore, JobStoreFull
from model_runtime.sandbox.errors import CapabilityDenied


def _request(chunks: list[bytes], headers: dict[str, str] | None = None) -> tuple[Request, list[int]]:
    pending = list(chunks)
    served: list[int] = []

    async def receive() -> dict[str, Any]:
        chunk = pending.pop(0)
        served.append(len(chunk))
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": "POST", "headers": raw}, receive), served


def test_chunked_body_is_refused_while_streaming() -> None:
    request, served = _request([b"x" * 1000] * 100)  # no Content-Length: chunked
    with pytest.raises(HttpError) as info:
        asyncio.run(read_body_capped(request, 5000))
    assert info.value.status == 413
    assert sum(served) <= 6000, "the body was read past the limit"


def test_declared_length_is_refused_before_reading() -> None:
    request, served = _request([b"x" * 10], {"content-length": str(10**10)})
    with pytest.raises(HttpError):
        asyncio.run(read_body_capped(request, 5000))
    assert served == []


def test_body_under_the_limit_is_kept_for_the_parser() -> None:
    request, _ = _request([b"ab", b"cd"])

    async def read() -> bytes:
        await read_body_capped(request, 10)
        return await request.body()

    assert asyncio.run(read()) == b"abcd"


def test_error_text_is_bounded() -> None:
    huge = "a" * 10**7
    assert len(str(CapabilityDenied(f"attribute {huge!r} is not available"))) < 5000
    assert len(bounded(huge)) < MAX_ERROR_CHARS + 100


def test_log_is_capped_in_total_and_per_line() -> None:
    lines: list[str] = []
    log = CappedLog(lines.append, max_bytes=10_000)
    for _ in range(1000):
        log("w" * 100)
    log("x" * 10**6)
    assert sum(len(line) for line in lines) < 11_000
    assert lines[-1].startswith("[log truncated")


def test_job_records_are_bounded_in_size() -> None:
    event = {"status": "ERROR", "description": "e" * 10**7, "meta": {"x": "m" * 10**6}}
    kept = bounded_event(event)
    assert len(kept["description"]) < MAX_DESCRIPTION_CHARS + 100
    assert len(str(kept["meta"])) < 1000


def test_job_store_is_bounded_in_count() -> None:
    store = JobStore(max_jobs=3)
    jobs = [store.new_job("m", "", "") for _ in range(3)]
    with pytest.raises(JobStoreFull):
        store.new_job("m", "", "")  # all three still running
    jobs[0].done = True
    newest = store.new_job("m", "", "")  # the finished one makes room
    assert store.get(jobs[0].id) is None and store.get(newest.id) is newest

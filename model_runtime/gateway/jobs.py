"""Jobs and sessions held by the gateway: server-minted ids, latest status, websocket queues.

State is in the gateway replica's memory, so the gateway runs as ONE replica (a websocket
session and its `POST /request` must meet in the same process). Finished jobs expire after
`ttl_seconds`; at most `max_jobs` are kept (the oldest finished ones go first).

A session's frames go through its bounded queue, which its websocket loop empties; `deliver` sends a
frame straight down the websocket instead when nothing of that session is queued or being sent
(the order stays the order of the pushes): a job's result frame leaves in the task that received
it, with no hop through the queue and the websocket loop's wake-ups.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

Frame = str | bytes
Sender = Callable[[Frame], Awaitable[None]]


def mint_id() -> str:
    """Unguessable: a result URL and `/response/{id}` are reachable with the id alone."""
    return secrets.token_urlsafe(24)


class JobStoreFull(Exception):
    """Every slot holds a job still running: a new one cannot be recorded."""


@dataclass
class Job:
    id: str
    model_key: str
    owner: str  # digest of the API key that submitted it ("" when auth is off)
    session_id: str
    created: float = field(default_factory=time.monotonic)
    latest: dict[str, Any] | None = None
    done: bool = False
    timings: dict[str, float] = field(default_factory=dict)  # epoch seconds per step (GET /timings)
    via: str = ""  # how it reached its replica: "channel" (direct) or "serve" (Serve's handle)


@dataclass
class _Session:
    queue: asyncio.Queue[Frame]
    send: Sender | None = None  # the websocket's own send, once its loop runs
    unsent: int = 0  # frames pushed and not yet sent by the websocket loop


class JobStore:
    def __init__(self, ttl_seconds: float = 3600.0, max_session_frames: int = 10_000, max_jobs: int = 10_000) -> None:
        # Insertion-ordered: the oldest finished jobs are dropped first when the store is full.
        self._jobs: dict[str, Job] = {}
        self._max_jobs = max_jobs
        self._sessions: dict[str, _Session] = {}
        self._ttl = ttl_seconds
        self._max_frames = max_session_frames

    # sessions (blocking clients' websockets)
    def open_session(self) -> tuple[str, asyncio.Queue[Frame]]:
        session_id = mint_id()
        queue: asyncio.Queue[Frame] = asyncio.Queue(self._max_frames)
        self._sessions[session_id] = _Session(queue)
        return session_id, queue

    def attach(self, session_id: str, send: Sender) -> None:
        """The session's websocket send, for `deliver`."""
        session = self._sessions.get(session_id)
        if session is not None:
            session.send = send

    def sent(self, session_id: str) -> None:
        """The websocket loop sent one queued frame."""
        session = self._sessions.get(session_id)
        if session is not None and session.unsent > 0:
            session.unsent -= 1

    def close_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def has_session(self, session_id: str) -> bool:
        return session_id in self._sessions

    def push(self, session_id: str, frame: Frame) -> None:
        session = self._sessions.get(session_id)
        if session is not None and not session.queue.full():
            session.queue.put_nowait(frame)
            session.unsent += 1

    async def deliver(self, session_id: str, frame: Frame) -> None:
        """Send `frame` now when nothing of the session is waiting (else queue it behind the rest)."""
        session = self._sessions.get(session_id)
        if session is None:
            return
        if session.send is None or session.unsent:
            self.push(session_id, frame)
            return
        try:
            await session.send(frame)  # uvicorn writes the frame to the socket without yielding
        except Exception:  # the client went away: its websocket loop ends the session
            pass

    # jobs
    def new_job(self, model_key: str, owner: str, session_id: str) -> Job:
        self._expire()
        if len(self._jobs) >= self._max_jobs:
            for old in [j.id for j in self._jobs.values() if j.done][: len(self._jobs) - self._max_jobs + 1]:
                del self._jobs[old]
            if len(self._jobs) >= self._max_jobs:
                raise JobStoreFull(f"the gateway holds {self._max_jobs} unfinished jobs; retry later")
        job = Job(id=mint_id(), model_key=model_key, owner=owner, session_id=session_id)
        self._jobs[job.id] = job
        return job

    def discard(self, job_id: str) -> None:
        """Forget a job the model refused before admitting it (the client got an HTTP error instead)."""
        self._jobs.pop(job_id, None)

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def active(self, session_id: str) -> list[Job]:
        return [j for j in self._jobs.values() if j.session_id == session_id and not j.done]

    def in_flight(self, model_key: str) -> int:
        return sum(1 for j in self._jobs.values() if j.model_key == model_key and not j.done)

    def _expire(self) -> None:
        # Insertion order is creation order: only the jobs older than the cutoff are looked at, not
        # every record on every request.
        cutoff = time.monotonic() - self._ttl
        expired = []
        for job in self._jobs.values():
            if job.created >= cutoff:
                break
            if job.done:
                expired.append(job.id)
        for job_id in expired:
            del self._jobs[job_id]

"""One request's stop on a tensor-parallel replica: rank 0 decides it, every rank applies it.

    with RequestStop(actors, request_no, timeout_s) as stop:   # fires "timeout" after timeout_s
        result = run_on_rank(..., stop=stop.event)  # rank 0's own request thread
        ...
        stop.fire("rank 1 did not finish")          # any other reason to end the request
    stop.fired                                      # the group must then be rebuilt

Each rank has its own clock, so if every rank timed itself out the stops would land at different
points of the model's forward. Here only rank 0's clock counts: the shard ranks run with a later
safety deadline, and on a stop rank 0 asks every shard actor to stop its request now
(`ShardRank.stop`: its request thread is cancelled as a single-device request is; a stop that
arrives before its request does stops that request on arrival). Each rank whose stopped request
has ended leaves the process group (`group.leave_group`); what each rank had issued no longer
matters: the replica then rebuilds the group (`group.rejoin_group`) and the next request starts
in step.
"""

from __future__ import annotations

import threading
from typing import Any

TIMEOUT = "timeout"


class RequestStop:
    def __init__(self, actors: list[Any], request_no: int, timeout_s: float) -> None:
        self.event = threading.Event()
        self.request_no = request_no
        self.reason: str | None = None
        self._actors = actors
        self._lock = threading.Lock()
        self._timer = threading.Timer(timeout_s, self.fire, args=(TIMEOUT,))
        self._timer.daemon = True

    def __enter__(self) -> RequestStop:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    @property
    def fired(self) -> bool:
        return self.reason is not None

    def fire(self, reason: str) -> None:
        """Stop the request on every rank (idempotent: the first reason wins)."""
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
        for actor in self._actors:
            # Answered while the rank's execute runs (threaded actor), or before it starts.
            actor.stop.remote(self.request_no)
        self.event.set()

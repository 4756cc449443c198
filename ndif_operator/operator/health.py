"""The operator's health endpoint: `/healthz` (liveness) and `/readyz` (readiness) for kubelet probes.

Liveness says the event loop still runs: a heartbeat task in the operator's loop stamps the time
every `BEAT_SECONDS`; a loop blocked (or dead) for `stall_seconds` answers 503, and kubelet
restarts the pod. The HTTP server runs on its own thread on purpose, so a stuck loop cannot also
stop the probe from being answered.

Readiness says the operator is doing its job: the planner has started watching (first pass
finished) and the passes have not been failing for `failing_seconds` in a row. A single failed
pass (an API hiccup retried with backoff) is not unready; only a sustained outage is.

The state is pure (`HealthState`, with an injectable clock) and unit-tested without HTTP.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BEAT_SECONDS = 2.0

Clock = Callable[[], float]


@dataclass
class HealthState:
    """What the probes read. Written from the event loop, read from the HTTP thread (floats/None: atomic)."""

    stall_seconds: float = 60.0
    failing_seconds: float = 300.0
    clock: Clock = time.monotonic
    last_beat: float | None = None
    first_pass_at: float | None = None
    failing_since: float | None = None  # first failed pass of the current run of failures
    passes: int = 0
    last_error: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def beat(self) -> None:
        self.last_beat = self.clock()

    def pass_finished(self, ok: bool, error: str = "") -> None:
        now = self.clock()
        with self._lock:
            self.passes += 1
            if self.first_pass_at is None:
                self.first_pass_at = now
            if ok:
                self.failing_since, self.last_error = None, ""
            else:
                if self.failing_since is None:
                    self.failing_since = now
                self.last_error = error

    def live(self) -> tuple[bool, str]:
        if self.last_beat is None:
            return True, "starting"  # the loop has not begun yet: kubelet's initialDelay covers start-up
        stalled = self.clock() - self.last_beat
        if stalled > self.stall_seconds:
            return False, f"event loop stalled for {stalled:.0f}s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        live, why = self.live()
        if not live:
            return False, why
        with self._lock:
            if self.first_pass_at is None:
                return False, "no planner pass finished yet"
            if self.failing_since is not None:
                failing = self.clock() - self.failing_since
                if failing >= self.failing_seconds:
                    return False, f"planner passes failing for {failing:.0f}s: {self.last_error}"
        return True, "ok"


STATE = HealthState()


async def heartbeat(state: HealthState = STATE, every: float = BEAT_SECONDS) -> None:
    """Run in the operator's event loop until cancelled."""
    while True:
        state.beat()
        await asyncio.sleep(every)


def _handler(state: HealthState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in ("/healthz", "/livez"):
                ok, why = state.live()
            elif path == "/readyz":
                ok, why = state.ready()
            else:
                self.send_error(404)
                return
            body = json.dumps({"ok": ok, "reason": why, "passes": state.passes}).encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # probes every few seconds: never log them

    return Handler


def serve(port: int, state: HealthState = STATE, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve the probes on a daemon thread. Returns the server (tests bind port 0 and read its port)."""
    server = ThreadingHTTPServer((host, port), _handler(state))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="ndif-health", daemon=True).start()
    return server

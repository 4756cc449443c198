"""The probe endpoint: liveness follows the event loop, readiness follows the planner passes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from loopback import free_port
from operator_harness import Cluster, OperatorThread, model_deployment, ray_service, wait_for

from ndif_operator.operator import health


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_liveness_fails_when_the_loop_stalls() -> None:
    clock = _Clock()
    state = health.HealthState(stall_seconds=60, clock=clock)
    assert state.live() == (True, "starting")
    state.beat()
    clock.now += 59
    assert state.live()[0]
    clock.now += 2
    ok, why = state.live()
    assert not ok and "stalled" in why


def test_readiness_tolerates_a_failed_pass_but_not_a_sustained_outage() -> None:
    clock = _Clock()
    state = health.HealthState(failing_seconds=300, clock=clock)
    state.beat()
    assert state.ready() == (False, "no planner pass finished yet")
    state.pass_finished(ok=True)
    assert state.ready()[0]
    state.pass_finished(ok=False, error="ml/ndif: 503")
    clock.now += 299
    state.beat()
    state.pass_finished(ok=False, error="ml/ndif: 503")  # still the same outage: measured from its start
    assert state.ready()[0]
    clock.now += 1
    state.beat()
    ok, why = state.ready()
    assert not ok and "ml/ndif: 503" in why
    state.pass_finished(ok=True)
    assert state.ready()[0]


def _get(port: int, path: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_http_codes() -> None:
    clock = _Clock()
    state = health.HealthState(clock=clock)
    server = health.serve(0, state, host="127.0.0.1")
    try:
        port = server.server_address[1]
        state.beat()
        assert _get(port, "/healthz")[0] == 200
        assert _get(port, "/readyz") == (503, {"ok": False, "reason": "no planner pass finished yet", "passes": 0})
        state.pass_finished(ok=True)
        assert _get(port, "/readyz")[0] == 200
        clock.now += 3600
        assert _get(port, "/healthz")[0] == 503
    finally:
        server.shutdown()
        server.server_close()


def test_a_running_operator_becomes_ready(cluster: Cluster) -> None:
    port = free_port()
    running = OperatorThread(cluster, health_port=port).start()
    try:
        cluster.emu.create_sync(ray_service())
        cluster.emu.create_sync(model_deployment("m", "org/m-8g"))
        wait_for(lambda: _get(port, "/readyz")[0] == 200, what="readiness after the first pass")
        assert _get(port, "/healthz")[0] == 200
    finally:
        running.stop()

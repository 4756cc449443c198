"""Runtime metrics: the error-kind vocabulary, the queue gauge kept alive at 0, gateway refusals by
model and reason (never a caller-chosen model name)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest

from model_runtime import metrics


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float, dict[str, str]]] = []

    def __getattr__(self, method: str) -> Any:
        return lambda value, tags: self.calls.append((method, value, tags))


@pytest.mark.parametrize(("error", "timed_out", "kind"), [
    ("[capabilities] open is not allowed", False, "sandbox_capabilities"),
    ("[code] name '__class__' is refused", False, "sandbox_code"),
    ("Internal error while running the request: RuntimeError: x", False, "internal"),
    ("Unreadable request payload: the blob is empty.", False, "unreadable"),
    ("Result of 9 bytes exceeds this model's limit of 8 bytes; save less", False, "result_too_large"),
    ("ZeroDivisionError: division by zero", False, "user_code"),
    ("anything", True, "timeout"),
])
def test_error_kinds_are_a_small_vocabulary(error: str, timed_out: bool, kind: str) -> None:
    assert metrics.error_kind(error, timed_out=timed_out) == kind


def test_queue_depth_is_kept_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    recorders: dict[str, _Recorder] = {}

    def fake(table: dict[str, Any]) -> dict[str, Any]:
        return {name: recorders.setdefault(name, _Recorder()) for name in table}

    monkeypatch.setattr(metrics, "_ray_metrics", fake)
    monkeypatch.setattr(metrics, "KEEPALIVE_SECONDS", 0.02)
    runtime = metrics.RuntimeMetrics()
    try:
        runtime.queue_depth("org/m", 0)
        deadline = time.monotonic() + 10
        while len(recorders["ndif_queue_depth"].calls) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert recorders["ndif_queue_depth"].calls[-1] == ("set", 0, {"model": "org/m"})
        assert len(recorders["ndif_queue_depth"].calls) >= 4  # re-set while idle
        runtime.request("org/m", "error", 0.1, 10, 0, kind="sandbox_code")
        assert ("inc", 1, {"model": "org/m", "kind": "sandbox_code"}) in recorders["ndif_request_errors"].calls
        assert runtime.snapshot()["errors_sandbox_code"] == 1
    finally:
        runtime.close()


def test_queue_depth_is_exported_when_it_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request admitted at once leaves the gauge alone (the replica reports the depth it finds at
    admission, unchanged); a change is exported at once, and the snapshot always follows."""
    recorders: dict[str, _Recorder] = {}
    monkeypatch.setattr(metrics, "_ray_metrics",
                        lambda table: {name: recorders.setdefault(name, _Recorder()) for name in table})
    runtime = metrics.RuntimeMetrics()
    try:
        for depth in (0, 0, 2, 2, 1, 0, 0):
            runtime.queue_depth("org/m", depth)
        assert [value for _, value, _ in recorders["ndif_queue_depth"].calls] == [0, 2, 1, 0]
        assert runtime.snapshot()["queue_depth"] == 0
    finally:
        runtime.close()


def test_gateway_refusals_by_model_and_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from model_runtime.gateway import app as gateway_app

    recorder = _Recorder()
    gateway = metrics.GatewayMetrics()
    gateway._ray = {"ndif_gateway_refusals": recorder}
    monkeypatch.setattr(gateway_app, "gateway_metrics", lambda: gateway)

    def refuse(path: str, status: int, **state: str) -> None:
        request: Any = SimpleNamespace(url=SimpleNamespace(path=path), state=SimpleNamespace(**state))
        asyncio.run(gateway_app._http_error(request, gateway_app.HttpError(status, "no")))

    refuse("/request", 401)
    refuse("/request", 404)  # a model that is not deployed: never the caller's string
    refuse("/request", 503, model="org/m")
    refuse("/request", 413, model="org/m")
    refuse("/result/abc", 404)  # not a request refusal
    assert [call[2] for call in recorder.calls] == [
        {"model": "unknown", "reason": "unauthorized"}, {"model": "unknown", "reason": "not_found"},
        {"model": "org/m", "reason": "unavailable"}, {"model": "org/m", "reason": "too_large"}]

"""activateOnRequest: demand read from the gateway's /status makes a Warm model Hot for a while."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from operator_harness import Cluster, FakeGateway, OperatorThread, model_deployment, ray_service, wait_for

from ndif_operator.api import Level
from ndif_operator.planning.activation import Demand, activation_until, demands_from_gateway_status


def _level(cluster: Cluster, name: str) -> str | None:
    return (cluster.md(name) or {}).get("status", {}).get("level")


def _reasons(cluster: Cluster, name: str) -> list[str]:
    return [e["reason"] for e in cluster.emu.list_sync(cluster.emu.rtype("", "v1", "events"))
            if e["involvedObject"]["name"] == name]


def test_warm_model_becomes_hot_on_request_then_returns_to_warm(cluster: Cluster, gateway: FakeGateway) -> None:
    cluster.emu.create_sync(ray_service())
    cluster.emu.create_sync(model_deployment("w", "org/m-10g", level="Warm", activateOnRequest=True))
    settings = {"gateway_url": gateway.url, "gateway_api_key": "sekret", "activation_ttl_seconds": 3.0,
                "activation_poll_seconds": 0.3}
    running = OperatorThread(cluster, **settings).start()
    try:
        wait_for(lambda: cluster.condition("w", "Placed").get("reason") == "PlacedWarm", what="Warm")
        gateway.demand("ml/w")
        wait_for(lambda: _level(cluster, "w") == "Hot", what="Hot on request")
        placed = cluster.condition("w", "Placed")
        assert (placed["status"], placed["reason"]) == ("True", "PlacedHot")
        assert "on request until" in placed["message"] and "activateOnRequest" in placed["message"]
        assert cluster.apps()["md-ml-w"]["deployments"][0]["user_config"]["level"] == "Hot"
        assert (cluster.md("w") or {})["spec"]["level"] == "Warm"
        first_until = (cluster.md("w") or {})["status"]["activatedUntil"]
        wait_for(lambda: "ActivatedOnRequest" in _reasons(cluster, "w"), what="activation event")
        # TTL over; the gateway's flag never clears, but a demand it cannot date was served already.
        wait_for(lambda: _level(cluster, "w") == "Warm", timeout=20, what="back to Warm")
        wait_for(lambda: "ActivationExpired" in _reasons(cluster, "w"), what="expiry event")
        time.sleep(1.0)
        assert _level(cluster, "w") == "Warm"
        assert set(gateway.keys_seen) == {"sekret"}
        # A new demand (dated after the last window) activates again.
        gateway.demand("ml/w", at=time.time())
        wait_for(lambda: _level(cluster, "w") == "Hot", what="Hot again")
        until = (cluster.md("w") or {})["status"]["activatedUntil"]
        assert until > first_until
    finally:
        running.stop()
    # The window is in status: a restarted operator keeps it (no new window, same end).
    running = OperatorThread(cluster, **settings).start()
    try:
        wait_for(lambda: _level(cluster, "w") == "Warm", timeout=20, what="Warm after the restored window")
        assert (cluster.md("w") or {})["status"]["activatedUntil"] == until
    finally:
        running.stop()


NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _until(demand: Demand | None, current: datetime | None = None, *, level: Level = Level.WARM,
           policy: bool = True, minimum: int = 0) -> datetime | None:
    return activation_until(activate_on_request=policy, spec_level=level, demand=demand, current_until=current,
                            now=NOW, minimum_deployment_seconds=minimum, ttl_seconds=60)


def test_activation_decision() -> None:
    asked = Demand(True)
    assert _until(asked) == NOW + timedelta(seconds=60)
    assert _until(asked, minimum=600) == NOW + timedelta(seconds=600)
    assert _until(asked, policy=False) is None and _until(asked, level=Level.HOT) is None
    assert _until(Demand(False)) is None and _until(None) is None
    active = NOW + timedelta(seconds=5)
    assert _until(asked, active) == active  # no extension while Hot
    ended = NOW - timedelta(seconds=5)
    assert _until(asked, ended) == ended  # an undated demand: served already
    assert _until(Demand(True, NOW - timedelta(seconds=10)), ended) == ended
    assert _until(Demand(True, NOW - timedelta(seconds=1)), ended) == NOW + timedelta(seconds=60)


def test_demands_from_gateway_status() -> None:
    body = {"deployments": {"md-ml-a": {"deployment": "ml/a", "activation_requested": True,
                                        "activation_requested_at": 1767225600.0},
                            "md-ml-b": {"deployment": "ml/b", "activation_requested": False},
                            "odd": "x", "gateway": {"activation_requested": True}}}
    demands = demands_from_gateway_status(body)
    assert demands == {"ml/a": Demand(True, NOW), "ml/b": Demand(False)}
    assert demands_from_gateway_status({"deployments": []}) == {}

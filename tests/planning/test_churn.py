"""Churn and messages: no eviction while a usable group has room, the fewest GPUs per replica
first, and moved/evicted models say from where to where and why."""

from __future__ import annotations

from datetime import UTC, datetime

from ndif_operator.api import Level, ModelDeployment, Reason
from ndif_operator.operator.requests import decode_assignments, encode_assignments
from ndif_operator.planning import CurrentPlacement, Inventory, PlacementRequest, ReplicaPlacement, WorkerGroup, plan
from ndif_operator.rendering import check_serve_config, render_serve_config

GIB = 2**30
NOW = datetime(2026, 12, 7, tzinfo=UTC)


def req(key: str, gib: float, **kw: object) -> PlacementRequest:
    return PlacementRequest(key=key, total_bytes=int(gib * GIB), weights_bytes=int(gib * GIB * 0.8), **kw)  # type: ignore[arg-type]


def test_a_new_replica_goes_where_there_is_room_instead_of_evicting() -> None:
    inventory = Inventory((WorkerGroup("a100", 1, 1, 40 * GIB, 100 * GIB), WorkerGroup("l4", 1, 8, 24 * GIB, 0)))
    first = plan(inventory, [req("ml/hi", 20, priority=10), req("ml/lo", 20)], now=NOW)
    assert {d.worker_group for d in first.decisions} == {"a100"} and first.gpus_used == 1  # one GPU for both

    def current(key: str) -> CurrentPlacement:
        d = first.decision(key)
        return CurrentPlacement(d.level, d.worker_group, d.assignments, since=NOW)

    second = plan(inventory, [req("ml/hi", 20, priority=10, replicas=2, current=current("ml/hi")),
                              req("ml/lo", 20, current=current("ml/lo"))], now=NOW)
    lo, hi = second.decision("ml/lo"), second.decision("ml/hi")
    assert lo.level == Level.HOT and not lo.moved and lo.assignments == first.decision("ml/lo").assignments
    assert hi.replicas == 2 and hi.worker_group == "a100" and hi.assignments[1].group == "l4"
    assert hi.assignments[1].fraction == 0.8334 and "1 replica on l4" in hi.message
    # The spilled replica survives the round trip through the annotation and the next plan.
    assert decode_assignments(encode_assignments(hi)) == hi.assignments
    again = plan(inventory, [req("ml/hi", 20, priority=10, replicas=2, current=CurrentPlacement(
        Level.HOT, "a100", decode_assignments(encode_assignments(hi)), since=NOW)), req("ml/lo", 20, current=current(
            "ml/lo"))], now=NOW)
    assert again.decision("ml/hi").assignments == hi.assignments and not again.decision("ml/hi").moved
    # Pinned rendering puts that slot on its l4 pod and GPU, with its l4 share.
    deployments = {k: ModelDeployment.model_validate({"metadata": {"name": k[3:], "namespace": "ml"},
                                                      "spec": {"model": {"repoId": f"org/{k[3:]}"}}})
                   for k in ("ml/hi", "ml/lo")}
    config = render_serve_config(second, deployments)
    check_serve_config(config)
    slot = next(a for a in config["applications"] if a["name"] == "md-ml-hi_r1")["deployments"][0]
    assert slot["ray_actor_options"]["label_selector"] == {"ndif.dev/pod": "l4-0"}
    assert slot["user_config"]["gpu_lease"] == {"ndif_gpu_0": 0.8334}  # its l4 share, leased when Hot


def test_one_larger_gpu_before_several_small_ones() -> None:
    inventory = Inventory((WorkerGroup("a100-40", 2, 8, 40 * GIB, 0), WorkerGroup("h100-80", 1, 8, 80 * GIB, 0),
                           WorkerGroup("h200-141", 1, 8, 141 * GIB, 0), WorkerGroup("l4-24", 2, 8, 24 * GIB, 0)))
    result = plan(inventory, [req("ml/m56", 56, tensor_parallel_size="auto"),
                              req("ml/m135", 135, tensor_parallel_size="auto"),
                              req("ml/m20", 20, tensor_parallel_size="auto")], now=NOW)
    # Never split over small GPUs what one larger GPU holds (a 56 GiB model on 2 A100-40s, a 135 GiB
    # one on 4): one GPU each, and the 20 GiB model fills the room left next to the 56 GiB one.
    assert all(d.tensor_parallel_size == 1 for d in result.decisions)
    assert result.decision("ml/m135").worker_group == "h200-141"
    assert result.decision("ml/m56").worker_group in ("h100-80", "h200-141")
    assert result.decision("ml/m20").assignments[0] == result.decision("ml/m56").assignments[0].__class__(
        pod=0, gpus=result.decision("ml/m56").assignments[0].gpus, fraction=result.decision("ml/m20").gpu_fraction)
    assert result.gpus_used == 2


def test_a_moved_model_says_from_where_to_where_and_why() -> None:
    inventory = Inventory((WorkerGroup("gpu", 1, 2, 80 * GIB, 0),))
    was = CurrentPlacement(Level.HOT, "gpu", (ReplicaPlacement(pod=1, gpus=(0,), fraction=0.25),), since=NOW)
    d = plan(inventory, [req("ml/m", 20, current=was)], now=NOW).decision("ml/m")  # pod 1 left the group
    assert d.level == Level.HOT and d.moved and d.reason == Reason.MOVED
    assert d.message.startswith("replica 0 moved from gpu pod 1 GPU 0 to gpu pod 0 GPU 0 (")
    resized = CurrentPlacement(Level.HOT, "gpu", (ReplicaPlacement(pod=0, gpus=(1,), fraction=0.5),), since=NOW)
    d = plan(inventory, [req("ml/m", 20, current=resized)], now=NOW).decision("ml/m")
    assert d.reason == Reason.MOVED and "its estimate changed" in d.message
    steady = CurrentPlacement(Level.HOT, "gpu", d.assignments, since=NOW)
    assert plan(inventory, [req("ml/m", 20, current=steady)], now=NOW).decision("ml/m").reason == Reason.PLACED_HOT


def test_an_evicted_model_says_where_it_was() -> None:
    inventory = Inventory((WorkerGroup("gpu", 1, 1, 80 * GIB, 200 * GIB),))
    was = CurrentPlacement(Level.HOT, "gpu", (ReplicaPlacement(pod=0, gpus=(0,), fraction=0.75),), since=NOW)
    result = plan(inventory, [req("ml/low", 60, current=was), req("ml/vip", 60, priority=5)], now=NOW)
    low = result.decision("ml/low")
    assert low.reason == Reason.EVICTED and low.level == Level.WARM
    assert "evicted by ml/vip (priority 5) from gpu pod 0 GPU 0; kept Warm" in low.message

"""The bounded re-packing search (planning/repack.py), and what it changes in plans on mixed fleets."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime

import pytest
from test_planner import assert_valid, carry

from ndif_operator.api import Level
from ndif_operator.planning import FRACTION_UNITS, Inventory, PlacementRequest, WorkerGroup, plan
from ndif_operator.planning import repack as repack_module
from ndif_operator.planning.repack import Piece, Spot, lower_bound, repack
from ndif_operator.planning.sizing import need_in

GIB = 1024**3
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
A100 = WorkerGroup("a100-40", pods=1, gpus_per_pod=4, gpu_memory_bytes=40 * GIB, cpu_memory_bytes=0)
H100 = WorkerGroup("h100-80", pods=1, gpus_per_pod=4, gpu_memory_bytes=80 * GIB, cpu_memory_bytes=0)
H200 = WorkerGroup("h200-141", pods=1, gpus_per_pod=2, gpu_memory_bytes=141 * GIB, cpu_memory_bytes=0)
L4 = WorkerGroup("l4-24", pods=1, gpus_per_pod=4, gpu_memory_bytes=24 * GIB, cpu_memory_bytes=0)
FLEET = (A100, H100, H200, L4)


def request(name: str, gib: float, replicas: int = 1) -> PlacementRequest:
    size = int(gib * GIB)
    return PlacementRequest(key=f"ml/{name}", total_bytes=size, weights_bytes=size, replicas=replicas,
                            tensor_parallel_size="auto")


def pieces(groups: tuple[WorkerGroup, ...], *requests: PlacementRequest) -> list[Piece]:
    """One piece per replica, allowed in every group it fits (with its need there)."""
    out: list[Piece] = []
    for r in requests:
        options = []
        for gi, g in enumerate(groups):
            need = need_in(r, g)
            if not isinstance(need, str):
                options.append((gi, need))
        out.extend(Piece(r.key, n, tuple(options)) for n in range(r.replicas))
    return out


def empty(groups: tuple[WorkerGroup, ...]) -> list[list[list[int]]]:
    return [[[FRACTION_UNITS] * g.gpus_per_pod for _ in range(g.pods)] for g in groups]


def used_after(free: list[list[list[int]]], found: dict[tuple[str, int], Spot]) -> int:
    """GPUs in use once `found` is applied, checking it never oversubscribes a GPU or stacks one
    model's replicas on a GPU."""
    left = [[list(pod) for pod in group] for group in free]
    per_model: dict[str, set[tuple[int, int, int]]] = defaultdict(set)
    for (key, _), spot in found.items():
        assert len(set(spot.gpus)) == len(spot.gpus)
        for gpu in spot.gpus:
            left[spot.group][spot.pod][gpu] -= spot.units
            assert left[spot.group][spot.pod][gpu] >= 0, "a GPU's shares exceed one GPU"
            assert (spot.group, spot.pod, gpu) not in per_model[key], "two replicas of one model on one GPU"
            per_model[key].add((spot.group, spot.pod, gpu))
    return sum(1 for group in left for pod in group for units in pod if units < FRACTION_UNITS)


# --- lower_bound ----------------------------------------------------------------------------------


def test_lower_bound_counts_used_gpus_and_covers_the_rest_with_the_largest_empty_ones() -> None:
    free = empty(FLEET)
    assert lower_bound(FLEET, free, pieces(FLEET, request("a", 130))) == 1  # one H200 holds it
    assert lower_bound(FLEET, free, pieces(FLEET, request("a", 100, replicas=3))) == 3  # 2 H200s, then an H100
    free[3][0][0] = FRACTION_UNITS // 2  # an L4 half used: counts, and its rest (12 GiB) holds a small model
    assert lower_bound(FLEET, free, pieces(FLEET, request("s", 10))) == 1


# --- repack ---------------------------------------------------------------------------------------


def test_finds_the_packing_a_largest_first_greedy_misses() -> None:
    # The optimum puts both large models and one replica of each small one on an H200, the other
    # replicas two by two on two more GPUs: 3 GPUs. Largest-first best fit opens a 4th or 5th.
    free = empty(FLEET)
    todo = pieces(FLEET, request("a", 8.4, 3), request("b", 8.1, 3), request("c", 40.3), request("d", 33.2))
    found = repack(FLEET, free, todo, beat=5)
    assert found is not None and set(found) == {(p.key, p.number) for p in todo}
    assert used_after(free, found) == 3


def test_nothing_when_the_packing_to_beat_is_at_the_lower_bound() -> None:
    todo = pieces(FLEET, request("a", 130), request("b", 5))
    assert lower_bound(FLEET, empty(FLEET), todo) == 1
    assert repack(FLEET, empty(FLEET), todo, beat=1) is None


def test_a_model_avoids_the_gpus_of_its_kept_replicas() -> None:
    groups = (H100,)
    free = empty(groups)
    free[0][0][0] = FRACTION_UNITS // 2  # a kept replica of "m" holds half of GPU 0
    free[0][0][1] = FRACTION_UNITS // 2  # another model holds half of GPU 1
    (piece,) = pieces(groups, request("m", 30))
    found = repack(groups, free, [Piece(piece.key, 1, piece.options, frozenset({(0, 0, 0)}))], beat=3)
    assert found is not None and found[("ml/m", 1)].gpus == (1,)


def test_replicas_of_one_model_take_the_same_rank_count() -> None:
    # One replica of a 138 GiB model fits the only H200; the other would need 2 H100s. One model's
    # replicas run one tensor-parallel plan, so both take 2 H100s: 4 GPUs, never 3.
    groups = (H100, WorkerGroup("h200-141", pods=1, gpus_per_pod=1, gpu_memory_bytes=141 * GIB,
                                cpu_memory_bytes=0))
    free = empty(groups)
    found = repack(groups, free, pieces(groups, request("big", 138, 2)), beat=5)
    assert found is not None
    assert {len(spot.gpus) for spot in found.values()} == {2}
    assert used_after(free, found) == 4


def test_the_work_budget_bounds_the_search() -> None:
    free = empty(FLEET)
    todo = pieces(FLEET, request("a", 8.4, 3), request("b", 8.1, 3), request("c", 40.3), request("d", 33.2))
    assert repack(FLEET, free, todo, beat=5, steps=0) is None
    assert repack(FLEET, free, todo, beat=5) == repack(FLEET, free, list(reversed(todo)), beat=5)  # deterministic


# --- in plans -------------------------------------------------------------------------------------


def test_mixed_fleet_plan_uses_the_optimum_where_greedy_did_not() -> None:
    inventory = Inventory(FLEET)
    requests = [request("a", 8.4, 3), request("b", 8.1, 3), request("c", 40.3), request("d", 33.2)]
    p = plan(inventory, requests, now=NOW)
    assert all(d.level == Level.HOT and d.replicas == r.replicas for d, r in zip(p.decisions, requests, strict=True))
    assert p.gpus_used == 3  # the ILP optimum (bench/mixed_fleet.py); largest-first best fit used 5
    assert_valid(inventory, requests, p)


def test_a_replica_the_placement_pass_left_out_is_placed_when_a_packing_exists(
        monkeypatch: pytest.MonkeyPatch) -> None:
    inventory = Inventory(FLEET)
    requests = [request("a", 136.95), request("b", 46.87, 2), request("c", 73.41), request("d", 135.11, 2),
                request("e", 45.08), request("f", 19.97, 2)]
    with monkeypatch.context() as patched:
        patched.setattr(repack_module, "MAX_PIECES", 0)  # the placement pass alone
        assert sum(d.replicas for d in plan(inventory, requests, now=NOW).decisions) == 8
    p = plan(inventory, requests, now=NOW)
    assert [d.replicas for d in p.decisions] == [r.replicas for r in requests]
    assert p.gpus_used == 10  # the ILP optimum (bench/mixed_fleet.py)
    assert_valid(inventory, requests, p)


def test_left_out_replicas_are_tried_higher_priority_first(monkeypatch: pytest.MonkeyPatch) -> None:
    tried: list[str] = []
    search = repack_module.repack

    def spy(*args: object, **kwargs: object) -> object:
        if kwargs.get("first"):
            tried.append(args[2][-1].key)  # type: ignore[index]
        return search(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(repack_module, "repack", spy)
    one_gpu = Inventory((WorkerGroup("h100-80", pods=1, gpus_per_pod=1, gpu_memory_bytes=80 * GIB,
                                     cpu_memory_bytes=0),))
    requests = [PlacementRequest(key=f"ml/p{priority}", total_bytes=60 * GIB, weights_bytes=60 * GIB,
                                 priority=priority) for priority in (0, 5, 3)]
    p = plan(one_gpu, requests, now=NOW)
    assert p.decision("ml/p5").level == Level.HOT
    assert tried == ["ml/p3", "ml/p0"]  # neither fits next to it; the search asked in priority order


def test_a_new_model_never_moves_kept_replicas_and_a_replan_moves_nothing() -> None:
    inventory = Inventory(FLEET)
    first_requests = [request("a", 8.4, 3), request("c", 40.3)]
    first = plan(inventory, first_requests, now=NOW)
    requests = [*carry(first, first_requests), request("b", 8.1, 3), request("d", 33.2)]
    second = plan(inventory, requests, now=NOW)
    assert second.moves == 0
    for key in ("ml/a", "ml/c"):
        assert second.decision(key).assignments == first.decision(key).assignments
    assert_valid(inventory, requests, second)
    again = plan(inventory, carry(second, requests), now=NOW)
    assert again.moves == 0 and again.decisions == second.decisions

"""Mixed fleets: the planner's GPU count against an exact optimum (ILP, pulp/CBC) and the
NDIF-style allocator, on random instances over A100-40 / H100-80 / H200-141 / L4-24 groups.

The optimum solves the same problem the planner does: every replica placed Hot, in one group,
its k ranks on k distinct GPUs of one pod with the planner's share per rank there (the sizing of
`need_in` per group: "auto" picks the fewest ranks that fit that group's GPUs), shares on a GPU
at most one GPU, one model's replicas on distinct GPUs and all with one rank count; minimise the
GPUs used. The relaxed optimum drops the last two rules (what they cost). The NDIF-style
allocator gives every replica `floor(size / GPU memory) + 1` whole GPUs of one pod, largest model
first, groups in inventory order (NDIF's own picks a random best node and assumes one GPU type).

Three fixed-seed sets: the first 25 instances of the original set (3-6 models, 6-139 GiB, 1-2
replicas, one pod per group), 50 harder ones (4-9 models, 3-139 GiB, 1-3 replicas), and, in the
full run, 10 on two pods per group (6-12 models up to 204 GiB). An instance is kept when the ILP
proves its optimum within 60 s (so the set does not depend on how our planner or NDIF's does);
ours must then place every replica too, and NDIF-style ratios use the instances it places fully.
Used by bench/planner.py (section "mixed fleets"); pulp is a bench/test dependency only.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

from ndif_operator.planning import Inventory, PlacementRequest, WorkerGroup, plan, repack
from ndif_operator.planning.sizing import need_in
from ndif_operator.planning.types import FRACTION_UNITS

GIB = 2**30
NOW = datetime(2026, 12, 7, tzinfo=UTC)


def fleet(pods: int = 1) -> Inventory:
    return Inventory((WorkerGroup("a100-40", pods, 4, 40 * GIB, 0), WorkerGroup("h100-80", pods, 4, 80 * GIB, 0),
                      WorkerGroup("h200-141", pods, 2, 141 * GIB, 0), WorkerGroup("l4-24", pods, 4, 24 * GIB, 0)))


def _requests(sizes: list[float], replicas: list[int]) -> list[PlacementRequest]:
    return [PlacementRequest(key=f"ml/m{i}", total_bytes=int(s * GIB), weights_bytes=int(s * GIB),
                             replicas=r, tensor_parallel_size="auto") for i, (s, r) in enumerate(zip(sizes, replicas,
                                                                                                       strict=True))]


def instance(rng: random.Random) -> list[PlacementRequest]:
    sizes = [rng.choice((6, 12, 18, 30, 45, 56, 70, 100, 135)) + rng.random() * 4 for _ in range(rng.randint(3, 6))]
    return _requests(sizes, [rng.choice((1, 1, 2)) for _ in sizes])


def harder_instance(rng: random.Random) -> list[PlacementRequest]:
    n = rng.randint(4, 9)
    sizes = [rng.choice((3, 6, 12, 16, 18, 24, 30, 38, 45, 56, 70, 75, 100, 120, 135)) + rng.random() * 4
             for _ in range(n)]
    return _requests(sizes, [rng.choice((1, 1, 2, 3)) for _ in sizes])


def larger_instance(rng: random.Random) -> list[PlacementRequest]:
    n = rng.randint(6, 12)
    sizes = [rng.choice((3, 6, 12, 16, 18, 24, 30, 38, 45, 56, 70, 75, 100, 120, 135, 150, 200)) + rng.random() * 4
             for _ in range(n)]
    return _requests(sizes, [rng.choice((1, 1, 2, 3)) for _ in sizes])


def ours(inventory: Inventory, requests: list[PlacementRequest], *, search: bool = True) -> int | None:
    """GPUs our plan uses, None if it leaves a replica out. `search=False`: the placement pass
    alone, without the re-packing search (planning/repack.py), for comparison in the same run."""
    saved = repack.MAX_PIECES
    repack.MAX_PIECES = saved if search else 0
    try:
        p = plan(inventory, requests, now=NOW)
    finally:
        repack.MAX_PIECES = saved
    if any(d.replicas != r.replicas for d, r in zip(p.decisions, sorted(requests, key=lambda r: r.key),
                                                          strict=True)):
        return None
    return p.gpus_used


def optimum(inventory: Inventory, requests: list[PlacementRequest], *, rules: bool = True) -> int | None:
    """The fewest GPUs that hold every replica. `rules`: with the planner's two rules on a model's
    replicas: on distinct GPUs (two on one GPU would share its compute and its failure), and all
    with one rank count (they run one tensor-parallel plan). Without them, a relaxation."""
    import pulp

    prob = pulp.LpProblem("gpus", pulp.LpMinimize)
    gpus = [(gi, p, j) for gi, g in enumerate(inventory.groups) for p in range(g.pods) for j in range(g.gpus_per_pod)]
    used = {gpu: pulp.LpVariable(f"u_{gpu[0]}_{gpu[1]}_{gpu[2]}", cat="Binary") for gpu in gpus}
    load: dict[tuple[int, int, int], list[tuple[int, pulp.LpVariable]]] = {gpu: [] for gpu in gpus}
    for r in requests:
        name = r.key[3:]
        mine: dict[tuple[int, int, int], list[pulp.LpVariable]] = {gpu: [] for gpu in gpus}
        needs = {gi: need for gi, g in enumerate(inventory.groups) if not isinstance(need := need_in(r, g), str)}
        if not needs:
            return None
        plan_of = {k: pulp.LpVariable(f"k_{name}_{k}", cat="Binary") for k in sorted({n.gpus for n in needs.values()})}
        if rules:
            prob += pulp.lpSum(plan_of.values()) == 1
        for n in range(r.replicas):
            choices = []
            by_ranks: dict[int, list[pulp.LpVariable]] = {k: [] for k in plan_of}
            for gi, need in needs.items():
                for p in range(inventory.groups[gi].pods):
                    pod = pulp.LpVariable(f"w_{name}_{n}_{gi}_{p}", cat="Binary")
                    choices.append(pod)
                    by_ranks[need.gpus].append(pod)
                    ranks = [pulp.LpVariable(f"z_{name}_{n}_{gi}_{p}_{j}", cat="Binary")
                             for j in range(inventory.groups[gi].gpus_per_pod)]
                    prob += pulp.lpSum(ranks) == need.gpus * pod
                    for j, z in enumerate(ranks):
                        load[(gi, p, j)].append((need.units, z))
                        mine[(gi, p, j)].append(z)
            prob += pulp.lpSum(choices) == 1
            for k, pods in by_ranks.items() if rules else ():
                prob += pulp.lpSum(pods) <= plan_of[k]
        for zs in mine.values() if rules and r.replicas > 1 else ():
            prob += pulp.lpSum(zs) <= 1
    for gpu, items in load.items():
        prob += pulp.lpSum(units * z for units, z in items) <= FRACTION_UNITS * used[gpu]
    prob += pulp.lpSum(used.values())
    prob.solve(pulp.PULP_CBC_CMD(msg=0, timeLimit=60))
    if pulp.LpStatus[prob.status] != "Optimal" or prob.sol_status != pulp.LpSolutionOptimal:
        return None  # infeasible, or not proven optimal within the time limit
    return round(pulp.value(prob.objective))


def ndif_style(inventory: Inventory, requests: list[PlacementRequest]) -> int | None:
    free = {(gi, p): g.gpus_per_pod for gi, g in enumerate(inventory.groups) for p in range(g.pods)}
    used = 0
    for r in sorted(requests, key=lambda r: (-(r.total_bytes or 0), r.key)):
        for _ in range(r.replicas):
            for (gi, p), left in sorted(free.items()):
                need = (r.total_bytes or 0) // inventory.groups[gi].gpu_memory_bytes + 1
                if need <= left:
                    free[(gi, p)] -= need
                    used += need
                    break
            else:
                return None
    return used


Generator = Callable[[random.Random], list[PlacementRequest]]
# (name, pods per group, instance generator, seed, instances, instances with --quick)
SETS: tuple[tuple[str, int, Generator, int, int, int], ...] = (
    ("original", 1, instance, 12, 25, 8),
    ("harder", 1, harder_instance, 2026, 50, 12),
    ("two pods per group", 2, larger_instance, 7, 10, 0),
)


def mixed_fleets(quick: bool) -> tuple[float, float]:
    """Prints each set's figures and the instances where ours uses more GPUs than the optimum;
    returns (worst ours/optimum, mean ours/NDIF-style) over every set."""
    all_opt: list[float] = []
    all_ndif: list[float] = []
    for name, pods, generate, seed, count, quick_count in SETS:
        wanted = quick_count if quick else count
        if not wanted:
            continue
        rng, inventory = random.Random(seed), fleet(pods)
        vs_opt, vs_ndif, vs_relaxed, vs_greedy, times = [], [], [], [], []
        tries = unproven = ours_short = ndif_short = greedy_short = 0
        while len(vs_opt) + ours_short < wanted and tries < 1000:
            tries += 1
            requests = generate(rng)
            best = optimum(inventory, requests)
            if best is None:
                unproven += 1  # no packing places every replica, or the ILP did not prove one in time
                continue
            start = time.perf_counter()
            o = ours(inventory, requests)
            times.append(time.perf_counter() - start)
            n = ndif_style(inventory, requests)
            greedy = ours(inventory, requests, search=False)
            if greedy is None:
                greedy_short += 1
            else:
                vs_greedy.append(greedy / best)
            if o is None:
                ours_short += 1
                continue
            vs_opt.append(o / best)
            relaxed = optimum(inventory, requests, rules=False)
            if relaxed is not None:
                vs_relaxed.append(o / relaxed)
            if n is None:
                ndif_short += 1
            else:
                vs_ndif.append(o / n)
            if o > best:
                sizes = ",".join(f"{(r.total_bytes or 0) / GIB:.0f}x{r.replicas}" for r in requests)
                print(f"  [{name}] [{sizes}] GiB x replicas: ours {o}, optimum {best}, NDIF-style {n}")
        all_opt += vs_opt
        all_ndif += vs_ndif
        print(f"  mixed fleets, {name} ({len(vs_opt) + ours_short} instances of {tries} drawn; {unproven} with no"
              f" packing of every replica, or none proven optimal in 60 s):"
              f" ours/optimum mean {statistics.mean(vs_opt):.3f}, worst {max(vs_opt):.3f},"
              f" {sum(r > 1 for r in vs_opt)} above 1; ours left replicas out on {ours_short};"
              f" placement pass alone (no search): mean {statistics.mean(vs_greedy):.3f},"
              f" worst {max(vs_greedy):.3f}, {sum(r > 1.15 for r in vs_greedy)} above 1.15, left replicas out on"
              f" {greedy_short};"
              f" ours/relaxed optimum mean {statistics.mean(vs_relaxed):.3f};"
              f" ours/NDIF-style mean {statistics.mean(vs_ndif):.3f}, worst {max(vs_ndif):.3f}"
              f" (NDIF-style left replicas out on {ndif_short}); plan time mean"
              f" {statistics.mean(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms")
    print(f"mixed fleets ({len(all_opt)} instances, A100-40 x4 / H100-80 x4 / H200-141 x2 / L4-24 x4 per pod):"
          f" ours/optimum mean {statistics.mean(all_opt):.3f}, worst {max(all_opt):.3f};"
          f" ours/NDIF-style mean {statistics.mean(all_ndif):.3f}, worst {max(all_ndif):.3f}")
    return max(all_opt), statistics.mean(all_ndif)


if __name__ == "__main__":
    import sys

    mixed_fleets(quick="--quick" in sys.argv)

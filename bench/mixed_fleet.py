"""Mixed fleets: the planner's GPU count against an exact optimum (ILP, pulp/CBC) and the
NDIF-style allocator, on small random instances over A100-40 / H100-80 / H200-141 / L4-24 groups.

The optimum solves the same problem the planner does: every replica placed Hot, in one group,
its k ranks on k distinct GPUs of one pod with the planner's share per rank there (the sizing of
`need_in` per group: "auto" picks the fewest ranks that fit that group's GPUs), shares on a GPU
at most one GPU; minimise the GPUs used. (It does not require one model's replicas to be on
different GPUs, which only lowers the optimum: ours / optimum is not flattered.) The NDIF-style
allocator gives every replica `floor(size / GPU memory) + 1` whole GPUs of one pod, largest model
first, groups in inventory order (NDIF's own picks a random best node and assumes one GPU type).
Used by bench/planner.py (section "mixed fleets"); pulp is a bench/test dependency only.
"""

from __future__ import annotations

import random
import statistics
from datetime import UTC, datetime

from ndif_operator.planning import Inventory, PlacementRequest, WorkerGroup, plan
from ndif_operator.planning.sizing import need_in
from ndif_operator.planning.types import FRACTION_UNITS

GIB = 2**30
NOW = datetime(2026, 12, 7, tzinfo=UTC)


def fleet() -> Inventory:
    return Inventory((WorkerGroup("a100-40", 1, 4, 40 * GIB, 0), WorkerGroup("h100-80", 1, 4, 80 * GIB, 0),
                      WorkerGroup("h200-141", 1, 2, 141 * GIB, 0), WorkerGroup("l4-24", 1, 4, 24 * GIB, 0)))


def instance(rng: random.Random) -> list[PlacementRequest]:
    sizes = [rng.choice((6, 12, 18, 30, 45, 56, 70, 100, 135)) + rng.random() * 4 for _ in range(rng.randint(3, 6))]
    return [PlacementRequest(key=f"ml/m{i}", total_bytes=int(s * GIB), weights_bytes=int(s * GIB),
                             replicas=rng.choice((1, 1, 2)), tensor_parallel_size="auto")
            for i, s in enumerate(sizes)]


def ours(inventory: Inventory, requests: list[PlacementRequest]) -> int | None:
    p = plan(inventory, requests, now=NOW)
    if any(d.replicas != r.replicas for d, r in zip(p.decisions, sorted(requests, key=lambda r: r.key),
                                                          strict=True)):
        return None
    return p.gpus_used


def optimum(inventory: Inventory, requests: list[PlacementRequest]) -> int | None:
    import pulp

    prob = pulp.LpProblem("gpus", pulp.LpMinimize)
    gpus = [(gi, p, j) for gi, g in enumerate(inventory.groups) for p in range(g.pods) for j in range(g.gpus_per_pod)]
    used = {gpu: pulp.LpVariable(f"u_{gpu[0]}_{gpu[1]}_{gpu[2]}", cat="Binary") for gpu in gpus}
    load: dict[tuple[int, int, int], list[tuple[int, pulp.LpVariable]]] = {gpu: [] for gpu in gpus}
    for r in requests:
        for n in range(r.replicas):
            choices = []
            for gi, g in enumerate(inventory.groups):
                need = need_in(r, g)
                if isinstance(need, str):
                    continue
                for p in range(g.pods):
                    pod = pulp.LpVariable(f"w_{r.key[3:]}_{n}_{gi}_{p}", cat="Binary")
                    choices.append(pod)
                    ranks = [pulp.LpVariable(f"z_{r.key[3:]}_{n}_{gi}_{p}_{j}", cat="Binary")
                             for j in range(g.gpus_per_pod)]
                    prob += pulp.lpSum(ranks) == need.gpus * pod
                    for j, z in enumerate(ranks):
                        load[(gi, p, j)].append((need.units, z))
            if not choices:
                return None
            prob += pulp.lpSum(choices) == 1
    for gpu, items in load.items():
        prob += pulp.lpSum(units * z for units, z in items) <= FRACTION_UNITS * used[gpu]
    prob += pulp.lpSum(used.values())
    prob.solve(pulp.PULP_CBC_CMD(msg=0, timeLimit=60))
    if pulp.LpStatus[prob.status] != "Optimal":
        return None
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


def mixed_fleets(quick: bool) -> tuple[float, float]:
    """Prints per-instance counts; returns (worst ours/optimum, mean ours/NDIF) over instances all three place."""
    rng = random.Random(12)
    inventory = fleet()
    vs_opt, vs_ndif = [], []
    tries = 0
    while len(vs_opt) < (8 if quick else 25) and tries < 400:
        tries += 1
        requests = instance(rng)
        o, best, n = ours(inventory, requests), optimum(inventory, requests), ndif_style(inventory, requests)
        if o is None or best is None or n is None:
            continue  # keep instances every method can place fully (a partial grant is not comparable)
        vs_opt.append(o / best)
        vs_ndif.append(o / n)
        sizes = ",".join(f"{(r.total_bytes or 0) / GIB:.0f}x{r.replicas}" for r in requests)
        print(f"  mixed fleet [{sizes}] GiB x replicas: ours {o}, optimum {best}, NDIF-style {n}")
    print(f"mixed fleets ({len(vs_opt)} instances, A100-40 x4 / H100-80 x4 / H200-141 x2 / L4-24 x4): "
          f"ours/optimum mean {statistics.mean(vs_opt):.3f}, worst {max(vs_opt):.3f}; "
          f"ours/NDIF-style mean {statistics.mean(vs_ndif):.3f}, worst {max(vs_ndif):.3f}")
    return max(vs_opt), statistics.mean(vs_ndif)


if __name__ == "__main__":
    mixed_fleets(quick=True)

"""Planner benchmark: speed at scale, GPU efficiency against a lower bound and NDIF's allocator, churn.

    .venv/bin/python bench/planner.py [--quick]

Baselines, measured in the same run:
- lower bound: total reserved memory / GPU memory, rounded up (no allocator can use fewer GPUs);
- whole-GPU bound: the same, once each multi-GPU replica holds its k tensor-parallel GPUs whole;
- NDIF-style allocator, implemented here after NDIF's own allocator: each model gets
  `floor(size / gpu_memory) + 1` whole GPUs, largest model first, on the first node with that many
  free GPUs (NDIF picks at random among equally good nodes; first-fit is kinder to it). It is fed
  the SAME per-model sizes as our planner, so the ratio isolates the allocation strategy;
- for churn, a stateless planner: the same plan recomputed from scratch (no current placements).

Both planner modes run: the default, where each tensor-parallel rank takes only its memory share
of its GPU, and `whole_gpu_tensor_parallel=True` (ranks hold whole GPUs), the previous behaviour.

The last line is the headline: GPUs our planner (default mode) uses for the NDIF catalog, as a
ratio of the NDIF-style allocator's.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime

from ndif_operator.api import DType, Level, ModelSpec, RuntimeLimits
from ndif_operator.evaluation import estimate_from_entry
from ndif_operator.evaluation.catalog import KNOWN_MODELS, catalog_entry
from ndif_operator.planning import (
    FRACTION_UNITS,
    CurrentPlacement,
    Inventory,
    PlacementRequest,
    Plan,
    WorkerGroup,
    plan,
)
from ndif_operator.planning.sizing import TP_SIZES, need_in

GIB = 1024**3
NOW = datetime(2026, 1, 1, tzinfo=UTC)
H100 = 80 * GIB
H200 = 141 * GIB
# Limits a typical NNsight experiment stays within (a few prompts of up to 2k tokens).
LIMITS = RuntimeLimits(max_batch_size=4, max_sequence_length=2048)
ANY_K = tuple(range(1, 9))
# (label, whole_gpu_tensor_parallel, TP sizes "auto" may pick). The default is the first; the last
# is what a runtime that splits layers (any rank count) instead of attention heads would allow.
MODES: tuple[tuple[str, bool, tuple[int, ...]], ...] = (
    ("fractional TP", False, TP_SIZES), ("whole-GPU TP", True, TP_SIZES), ("fractional, any k", False, ANY_K))


def cluster(pods: int, gpu_memory: int = H100, gpus: int = 8) -> Inventory:
    return Inventory((WorkerGroup("gpu", pods=pods, gpus_per_pod=gpus, gpu_memory_bytes=gpu_memory,
                                  cpu_memory_bytes=2048 * GIB),))


def catalog_requests(*, include_405b: bool) -> list[PlacementRequest]:
    """One deployment per model NDIF hosts (the seed catalog), at their real bf16 sizes."""
    out = []
    for known in KNOWN_MODELS:
        if "405B" in known.repo_id and not include_405b:
            continue
        entry = catalog_entry(ModelSpec(repo_id=known.repo_id, dtype=DType.BFLOAT16))
        assert entry is not None
        est = estimate_from_entry(entry, LIMITS)
        out.append(PlacementRequest(key=f"ndif/{known.repo_id.lower()}", total_bytes=est.total_bytes,
                                    weights_bytes=est.weights_bytes, tensor_parallel_size="auto",
                                    rank_bytes=tuple((r.tensor_parallel_size, r.bytes) for r in est.ranks)))
    return out


def random_mix(rng: random.Random, n: int, gpu_memory: int = H100) -> list[PlacementRequest]:
    """Mostly small models (log-uniform 0.3 GiB .. one GPU), a tenth spanning 2-8 GPUs."""
    out = []
    for i in range(n):
        if rng.random() < 0.1:
            total = int(rng.uniform(1.05, 7.5) * gpu_memory)
        else:
            total = int(math.exp(rng.uniform(math.log(0.3 * GIB), math.log(gpu_memory * 0.95))))
        out.append(PlacementRequest(key=f"mix/m{i:05d}", total_bytes=total, weights_bytes=int(total * 0.8),
                                    tensor_parallel_size="auto", replicas=1))
    return out


def lower_bound(requests: Sequence[PlacementRequest], gpu_memory: int, placed: set[str] | None = None) -> int:
    total = sum((r.total_bytes or 0) * r.replicas for r in requests if placed is None or r.key in placed)
    return math.ceil(total / gpu_memory)


def whole_gpu_bound(requests: Sequence[PlacementRequest], group: WorkerGroup, placed: set[str] | None = None) -> int:
    """The bound once multi-GPU replicas take their k TP GPUs whole (the planner's own k): those
    GPUs count whole, the single-GPU models share the rest perfectly."""
    whole, shared = 0, 0
    for r in requests:
        if placed is not None and r.key not in placed:
            continue
        need = need_in(r, group, whole_gpu_tensor_parallel=True)
        assert not isinstance(need, str), need
        if need.gpus > 1:
            whole += need.gpus * r.replicas
        else:
            shared += (r.total_bytes or 0) * r.replicas
    return whole + math.ceil(shared / group.gpu_memory_bytes)


def rank_bound(requests: Sequence[PlacementRequest], group: WorkerGroup, whole: bool, sizes: tuple[int, ...],
               placed: set[str] | None = None) -> int:
    """A tighter bound for a given way of splitting models: the memory bound, or the number of
    pieces (TP ranks and single-GPU replicas) over half a GPU, since no two of those share a GPU."""
    big = 0
    for r in requests:
        if placed is not None and r.key not in placed:
            continue
        need = need_in(r, group, whole_gpu_tensor_parallel=whole, auto_sizes=sizes)
        assert not isinstance(need, str), need
        if need.units * 2 > FRACTION_UNITS:
            big += need.gpus * r.replicas
    return max(big, lower_bound(requests, group.gpu_memory_bytes, placed))


def ndif_allocator(inventory: Inventory, requests: Sequence[PlacementRequest]) -> tuple[int, set[str]]:
    """NDIF's whole-GPU placement (no evictions: everything starts empty). Returns (GPUs used, placed keys)."""
    group = inventory.groups[0]
    free = [group.gpus_per_pod] * group.pods
    used, placed = 0, set()
    for r in sorted(requests, key=lambda r: (-(r.total_bytes or 0), r.key)):
        need = (r.total_bytes or 0) // group.gpu_memory_bytes + 1
        for _ in range(r.replicas):
            node = next((i for i, f in enumerate(free) if f >= need), None)
            if node is None:
                break
            free[node] -= need
            used += need
            placed.add(r.key)
    return used, placed


def hot_keys(p: Plan) -> set[str]:
    return {d.key for d in p.decisions if d.level == Level.HOT and d.replicas}


def carry(p: Plan, requests: Sequence[PlacementRequest]) -> list[PlacementRequest]:
    out = []
    for r in requests:
        d = p.decision(r.key)
        out.append(replace(r, current=CurrentPlacement(level=d.level, worker_group=d.worker_group,
                                                       replicas=d.assignments, since=d.since)))
    return out


def timed(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def scale(quick: bool) -> None:
    print("== scale: 2,000 deployments onto 250 pods x 8 GPUs (80 GiB)")
    rng = random.Random(7)
    inventory = cluster(250)
    requests = random_mix(rng, 2000)
    repeat = 1 if quick else 3
    ndif = timed(lambda: ndif_allocator(inventory, requests), repeat)
    # A full cluster: 3,300 deployments (all 2,000 GPUs busy), then 300 higher-priority ones
    # arrive and must evict their way in.
    over = random_mix(random.Random(9), 3600)
    base, late = over[:3300], [replace(r, priority=1) for r in over[3300:]]
    headline = 0.0
    for label, whole, sizes in MODES:
        def run(reqs: Sequence[PlacementRequest], whole: bool = whole, sizes: tuple[int, ...] = sizes) -> Plan:
            return plan(inventory, reqs, now=NOW, whole_gpu_tensor_parallel=whole, auto_tensor_parallel_sizes=sizes)

        fresh = timed(lambda: run(requests), repeat)
        first = run(requests)
        steady_requests = carry(first, requests)
        steady = timed(lambda: run(steady_requests), repeat)  # noqa: B023 (called right away)
        current = carry(run(base), base)
        contested_plan = run(current + late)
        contested = timed(lambda: run(current + late), repeat)  # noqa: B023
        placed_late = len(hot_keys(contested_plan) & {r.key for r in late})
        print(f"  [{label}] fresh plan {fresh * 1000:7.1f} ms ({len(hot_keys(first))} HOT, "
              f"{first.gpus_used}/{first.gpus_total} GPUs); re-plan, all placed {steady * 1000:7.1f} ms; "
              f"full cluster + 300 higher-priority newcomers {contested * 1000:7.1f} ms "
              f"({placed_late}/300 placed, {contested_plan.moves} evictions)")
        if not headline:
            headline = fresh
    print(f"  NDIF-style allocator {ndif * 1000:7.1f} ms (ours, fractional TP / NDIF: {headline / ndif:.1f}x time)")
    print(f"  scale: fresh plan of 2,000 deployments in {headline:.3f} s (target < 1 s)")


def repack_cost(quick: bool) -> None:
    """The re-packing search's cost where it is largest: a re-plan of the 2,000-GPU inventory with
    16 new models x 3 replicas (48, the most it searches), against the same plan without it."""
    from ndif_operator.planning import repack

    print("== re-packing search: 16 new models x 3 replicas arrive on 250 pods x 8 GPUs")
    inventory = cluster(250)
    repeat = 1 if quick else 3
    new = [replace(r, key=f"new/m{i}", replicas=3) for i, r in enumerate(random_mix(random.Random(11), 16))]
    for label, count in (("half full", 1000), ("full", 3300)):
        requests = random_mix(random.Random(7), count)
        current = carry(plan(inventory, requests, now=NOW), requests)

        def run(current: list[PlacementRequest] = current) -> Plan:
            return plan(inventory, current + new, now=NOW)

        on, p_on = timed(run, repeat), run()
        saved = repack.MAX_PIECES
        repack.MAX_PIECES = 0  # the placement pass alone
        try:
            off, p_off = timed(run, repeat), run()
        finally:
            repack.MAX_PIECES = saved
        placed_on = sum(p_on.decision(r.key).replicas for r in new)
        placed_off = sum(p_off.decision(r.key).replicas for r in new)
        print(f"  [{label}] re-plan {on * 1000:7.1f} ms with the search, {off * 1000:7.1f} ms without"
              f" ({on / off:.2f}x); new replicas placed {placed_on}/48 vs {placed_off}/48;"
              f" GPUs used {p_on.gpus_used} vs {p_off.gpus_used}")


def quality(quick: bool) -> float:
    print("== quality: GPUs used vs the lower bound and vs the NDIF-style allocator (same sizes)")
    print("  bound = memory / GPU memory; whole = the bound when multi-GPU replicas hold whole GPUs;")
    print("  ranks = max(bound, pieces over half a GPU) for the mode's split: no allocator can beat it")
    print(f"  {'workload':41} {'mode':17} {'ours':>4} {'bound':>5} {'whole':>5} {'ranks':>5} {'NDIF':>4} "
          f"{'ours/bound':>10} {'ours/whole':>10} {'ours/ranks':>10} {'ours/NDIF':>9}  placed")
    headline = 0.0
    for name, inventory, requests in (
        ("NDIF catalog, 8x80 GiB pods (no 405B)", cluster(8), catalog_requests(include_405b=False)),
        ("NDIF catalog, 8x141 GiB pods (with 405B)", cluster(8, H200), catalog_requests(include_405b=True)),
    ):
        group = inventory.groups[0]
        ndif_used, ndif_placed = ndif_allocator(inventory, requests)
        for label, whole, sizes in MODES:
            p = plan(inventory, requests, now=NOW, whole_gpu_tensor_parallel=whole, auto_tensor_parallel_sizes=sizes)
            placed = hot_keys(p)
            lb = lower_bound(requests, group.gpu_memory_bytes, placed)
            wb = whole_gpu_bound(requests, group, placed)
            rb = rank_bound(requests, group, whole, sizes, placed)
            used = p.gpus_used
            print(f"  {name:41} {label:17} {used:4d} {lb:5d} {wb:5d} {rb:5d} {ndif_used:4d} {used / lb:10.3f} "
                  f"{used / wb:10.3f} {used / rb:10.3f} {used / ndif_used:9.3f}  {len(placed)}/{len(requests)} "
                  f"(NDIF {len(ndif_placed)}/{len(requests)})")
            if not headline:
                headline, ours_catalog = used / ndif_used, used
    # NDIF as deployed sizes models as weights x 1.15 (no KV/activation budget, so it can run out of
    # memory under load); shown for completeness, not as a like-for-like comparison.
    as_deployed = [replace(r, total_bytes=int((r.weights_bytes or 0) * 1.15))
                   for r in catalog_requests(include_405b=False)]
    ndif_own, _ = ndif_allocator(cluster(8), as_deployed)
    print(f"  NDIF as deployed (weights x 1.15, whole GPUs) on the 80 GiB catalog: {ndif_own} GPUs "
          f"(ours, fractional TP, with a full runtime budget: {ours_catalog}, {ours_catalog / ndif_own:.3f}x)")
    seeds = range(3 if quick else 10)
    mixes = [random_mix(random.Random(seed), 300) for seed in seeds]
    small_mixes = [[r for r in random_mix(random.Random(100 + seed), 400) if (r.total_bytes or 0) <= H100][:300]
                   for seed in seeds]
    inventory = cluster(64)
    group = inventory.groups[0]
    for label, whole, sizes in MODES:
        ratios = []
        for requests in mixes:
            p = plan(inventory, requests, now=NOW, whole_gpu_tensor_parallel=whole, auto_tensor_parallel_sizes=sizes)
            ndif_used, ndif_placed = ndif_allocator(inventory, requests)
            # Compare on what both placed (the cluster is large enough that both place everything).
            assert hot_keys(p) == ndif_placed == {r.key for r in requests}, "random mix must fit entirely"
            used = p.gpus_used
            ratios.append((used / lower_bound(requests, H100), used / ndif_used,
                           used / whole_gpu_bound(requests, group), used / rank_bound(requests, group, whole, sizes)))
        print(f"  [{label}] random mixes, 300 models, 10% multi-GPU ({len(ratios)} seeds): ours/bound mean "
              f"{statistics.mean(r[0] for r in ratios):.3f} max {max(r[0] for r in ratios):.3f}; "
              f"ours/whole mean {statistics.mean(r[2] for r in ratios):.3f}; "
              f"ours/ranks mean {statistics.mean(r[3] for r in ratios):.3f}; "
              f"ours/NDIF mean {statistics.mean(r[1] for r in ratios):.3f}")
        print(f"    ours/bound per mix: {' '.join(f'{r[0]:.3f}' for r in ratios)}")
    small_ratios = [plan(inventory, requests, now=NOW).gpus_used / lower_bound(requests, H100)
                    for requests in small_mixes]
    print(f"  random mixes, single-GPU models only (all modes alike): ours/bound mean "
          f"{statistics.mean(small_ratios):.3f} max {max(small_ratios):.3f}")
    return headline


def churn(quick: bool) -> None:
    print("== churn: placements moved by adding / removing one deployment in a full cluster")
    inventory = cluster(16)  # 128 GPUs
    trials = 5 if quick else 20
    for label, whole, sizes in MODES:
        def run(reqs: Sequence[PlacementRequest], whole: bool = whole, sizes: tuple[int, ...] = sizes) -> Plan:
            return plan(inventory, reqs, now=NOW, whole_gpu_tensor_parallel=whole, auto_tensor_parallel_sizes=sizes)

        add_moves, remove_moves, add_scratch, remove_scratch, promoted = [], [], [], [], []
        for seed in range(trials):
            rng = random.Random(1000 + seed)
            requests = random_mix(rng, 300)  # more than 128 GPUs hold: the cluster is full
            first = run(requests)
            assert any(d.level != Level.HOT for d in first.decisions), "cluster must be full"
            current = carry(first, requests)

            def changed(before: Plan, after: Plan, keys: set[str]) -> int:
                return sum(1 for k in keys if before.decision(k).level == Level.HOT
                           and (after.decision(k).level, after.decision(k).assignments)
                           != (before.decision(k).level, before.decision(k).assignments))

            keys = {r.key for r in requests}
            newcomer = random_mix(random.Random(seed), 1)[0]
            newcomer = replace(newcomer, key="mix/new", priority=rng.choice([0, 1]))
            added = run([*current, newcomer])
            add_moves.append(changed(first, added, keys))
            add_scratch.append(changed(first, run([*requests, newcomer]), keys))
            victim = rng.choice([d.key for d in first.decisions if d.level == Level.HOT])
            rest = [r for r in current if r.key != victim]
            removed = run(rest)
            remove_moves.append(changed(first, removed, keys - {victim}))
            promoted.append(sum(1 for r in rest if first.decision(r.key).level != Level.HOT
                                and removed.decision(r.key).level == Level.HOT))
            scratch = run([r for r in requests if r.key != victim])
            remove_scratch.append(changed(first, scratch, keys - {victim}))
        print(f"  [{label}] add one (priority 0 or 1), {trials} trials: HOT placements changed mean "
              f"{statistics.mean(add_moves):.2f} max {max(add_moves)} (from-scratch planner: mean "
              f"{statistics.mean(add_scratch):.1f})")
        print(f"  [{label}] remove one: HOT placements changed mean {statistics.mean(remove_moves):.2f} max "
              f"{max(remove_moves)} (from-scratch planner: mean {statistics.mean(remove_scratch):.1f}); "
              f"waiting models promoted into the freed room: mean {statistics.mean(promoted):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and seeds")
    args = parser.parse_args()
    scale(args.quick)
    repack_cost(args.quick)
    headline = quality(args.quick)
    churn(args.quick)
    from mixed_fleet import mixed_fleets  # pulp (bench/test extra) solves the exact optimum

    worst_vs_optimum, vs_ndif = mixed_fleets(args.quick)
    print(f"mixed fleets: ours/optimum worst {worst_vs_optimum:.3f}, ours/NDIF-style mean {vs_ndif:.3f}")
    print(f"headline: NDIF catalog on 8x80 GiB pods uses {headline:.3f}x the GPUs of the NDIF-style allocator"
          " (fractional TP ranks)")


if __name__ == "__main__":
    main()

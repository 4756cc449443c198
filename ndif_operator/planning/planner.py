"""The placement planner: a pure function from (inventory, requests, now) to a plan.

Rules, in the order they apply (docs/placement.md has the rationale):

1. Keep what is placed. Every HOT replica the status says is placed, and that still fits the
   inventory and the request's current size, keeps its exact GPUs. This is what makes plans
   stable: adding a model never moves another one into free space, removing one moves nothing.
2. Place what is missing (new models, new replicas, displaced ones) one request at a time:
   dedicated first, then higher priority, then models that were placed before, then larger
   first (best-fit decreasing packs well), then by key. A replica that fits one GPU takes a
   memory-proportional share of the GPU with the least room that still holds it; a larger one is
   split over k tensor-parallel ranks (sizing.py), each taking a share of its own GPU, the k GPUs
   distinct and in one pod, tightest first (or, with whole_gpu_tensor_parallel, k whole GPUs in
   the pod with the fewest whole free GPUs that suffices).
3. When nothing is free, evict (eviction.py): a dedicated request may evict any non-dedicated model; otherwise
   only models of lower priority, or of equal priority that opted into time sharing
   (minimumDeploymentSeconds > 0) and have been HOT at least that long. Only placements carried
   over from the previous plan are evicted (never one made in this plan), so the search ends.
   The cheapest location wins: fewest victims, then lowest victim priority, then least memory.
4. Re-pack what this plan placed (repack.py): a bounded search moves only the replicas placed in
   this plan, to add replicas step 2 left out (in placement order) and then to use fewer GPUs.
5. What is not HOT goes WARM in CPU RAM (warm_placement.py) when the request allows it and a
   pod has room (preferring the pod it is already in, or was HOT in), else COLD; a
   higher-priority (or dedicated) model may send lower-priority WARM models to COLD to make room.
   Every such decision says why.

Each request's decision, with the message that says why, is written by decisions.py.

Everything is sorted before use so the same input gives the same plan byte for byte, whatever
the order of `requests`.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from datetime import datetime

from ndif_operator.api import Level
from ndif_operator.api.units import human_bytes
from ndif_operator.planning import repack
from ndif_operator.planning.capacity import GroupCapacity
from ndif_operator.planning.decisions import Decider, summary
from ndif_operator.planning.eviction import Eviction
from ndif_operator.planning.plan_state import RequestState, Slot, order
from ndif_operator.planning.schedule import apply_schedule
from ndif_operator.planning.sizing import TP_SIZES, Need, check_tp_sizes, need_in
from ndif_operator.planning.types import (
    FRACTION_UNITS,
    Inventory,
    PlacementRequest,
    Plan,
    ReplicaPlacement,
)
from ndif_operator.planning.warm_placement import place_warm
from ndif_operator.scheduling.bookings import Schedule


class _Planner:
    def __init__(
        self,
        inventory: Inventory,
        requests: Sequence[PlacementRequest],
        now: datetime,
        whole_gpu_tp: bool,
        auto_tp_sizes: tuple[int, ...],
    ) -> None:
        check_tp_sizes(auto_tp_sizes)
        self.inventory = inventory
        self.whole_gpu_tp = whole_gpu_tp
        self.auto_tp_sizes = auto_tp_sizes
        self.groups = inventory.groups
        self.now = now
        self.caps = [GroupCapacity.empty(g) for g in self.groups]
        self.group_index = {g.name: i for i, g in enumerate(self.groups)}
        keys = [r.key for r in requests]
        if len(set(keys)) != len(keys):
            dupes = sorted({k for k in keys if keys.count(k) > 1})
            raise ValueError(f"duplicate placement request keys: {dupes}")
        self.states = {r.key: RequestState(req=r, order=order(r)) for r in sorted(requests, key=lambda r: r.key)}
        self.eviction = Eviction(self.caps, self.states, now)
        # Group preference for new placements: the smallest GPUs that hold the model, so that big
        # GPUs stay free for the models that need them.
        self.group_pref = sorted(
            range(len(self.groups)), key=lambda i: (self.groups[i].gpu_memory_bytes, self.groups[i].name)
        )

    # --- phase 1: keep ------------------------------------------------------------------------

    def keep_current(self) -> None:
        for st in sorted(self.states.values(), key=lambda s: s.order):
            cur = st.req.current
            if not st.wants_hot or cur is None or cur.level != Level.HOT or cur.worker_group is None:
                continue
            gi = self.group_index.get(cur.worker_group)
            if gi is None:
                continue
            need = self.need(st.req, gi)
            if isinstance(need, str):
                continue
            st.group, st.need = gi, need
            st.next_replica = len(cur.replicas)
            for number, rp in enumerate(cur.replicas[: st.req.replicas]):
                slot_group = self.group_index.get(rp.group) if rp.group is not None else gi
                if slot_group is None:
                    continue
                slot_need = need if slot_group == gi else self.need(st.req, slot_group)
                cap = self.caps[slot_group]
                if isinstance(slot_need, str) or slot_need.gpus != need.gpus or not self._slot_fits(cap, rp, slot_need):
                    continue
                slot = Slot(slot_group, rp.pod, rp.gpus, slot_need.units, incumbent=True)
                cap.allocate((st.req.key, number), rp.pod, rp.gpus, slot_need.units)
                st.slots[number] = slot
                self.eviction.add_incumbent(slot_group, st.req.priority, (st.req.key, number), st.req.key)
            if not st.slots:
                st.group = st.need = None

    def need(self, req: PlacementRequest, gi: int) -> Need | str:
        return need_in(req, self.groups[gi], whole_gpu_tensor_parallel=self.whole_gpu_tp,
                       auto_sizes=self.auto_tp_sizes)

    @staticmethod
    def _slot_fits(cap: GroupCapacity, rp: ReplicaPlacement, need: Need) -> bool:
        group = cap.group
        if not 0 <= rp.pod < group.pods or len(rp.gpus) != need.gpus or len(set(rp.gpus)) != len(rp.gpus):
            return False
        if round(rp.fraction * FRACTION_UNITS) != need.units:
            return False  # the model's size changed: re-place it with its new share
        return all(0 <= g < group.gpus_per_pod and cap.free[rp.pod][g] >= need.units for g in rp.gpus)

    # --- phase 2: place -----------------------------------------------------------------------

    def place_missing(self) -> None:
        heap = [(st.order, st.req.key) for st in self.states.values() if st.missing > 0]
        heapq.heapify(heap)
        while heap:
            _, key = heapq.heappop(heap)
            st = self.states[key]
            if st.missing <= 0:
                continue
            for victim in self._place(st):
                heapq.heappush(heap, (self.states[victim].order, victim))

    def _place(self, st: RequestState) -> list[str]:
        """Place `st`'s missing replicas; return the keys of the requests it evicted."""
        evicted: list[str] = []
        st.why_short = ""
        if st.group is None and not self._choose_group(st, evicted):
            return evicted
        assert st.group is not None and st.need is not None
        need = st.need
        while st.missing > 0:
            where = self._fit(st, st.group, need)
            if where is None and self._spill(st):
                continue  # free room in another group the model can use: never evict for it
            where = where or self.eviction.evict_for(st, st.group, need, evicted)
            if where is None:
                st.why_short = self._shortage(st, [st.group])
                break
            self._allocate(st, st.group, where)
        return evicted

    def _feasible(self, st: RequestState) -> tuple[list[tuple[int, Need]], list[str]]:
        """Groups that can hold a replica, best first: the fewest GPUs per replica (one larger GPU
        over several small ones), then the smallest GPUs that hold it (big GPUs stay free for
        the models that need them); and why the others cannot."""
        feasible: list[tuple[int, Need]] = []
        reasons: list[str] = []
        for gi in self.group_pref:
            need = self.need(st.req, gi)
            if isinstance(need, str):
                reasons.append(need)
            else:
                feasible.append((gi, need))
        feasible.sort(key=lambda item: item[1].gpus)  # stable: GPU size order within a count
        return feasible, reasons

    def _choose_group(self, st: RequestState, evicted: list[str]) -> bool:
        feasible, reasons = self._feasible(st)
        if not feasible:
            st.why_short = "; ".join(reasons) if reasons else "the inventory has no worker groups"
            return False
        found = self._best_free_fit(st, feasible)
        if found is not None:
            st.group, st.need = found[0], found[1]
            self._allocate(st, found[0], found[2])
            return True
        for gi, need in feasible:
            st.group, st.need = gi, need
            where = self.eviction.evict_for(st, gi, need, evicted)
            if where is not None:
                self._allocate(st, gi, where)
                return True
        st.group = st.need = None
        st.why_short = self._shortage(st, [gi for gi, _ in feasible])
        return False

    def _best_free_fit(self, st: RequestState, feasible: list[tuple[int, Need]]
                       ) -> tuple[int, Need, tuple[int, tuple[int, ...]]] | None:
        """Where a first replica goes without evicting, to use the fewest GPUs: among the groups
        needing the fewest GPUs per replica, the partly used GPU(s) it fills tightest (in bytes,
        across groups); if none, an empty GPU in the group with the largest GPUs, whose rest is
        the most room for the smaller models placed after it (models are placed largest first)."""
        for count in sorted({need.gpus for _, need in feasible}):
            tier = [(gi, need) for gi, need in feasible if need.gpus == count]
            options = []
            for gi, need in tier:
                where = self._fit(st, gi, need)
                if where is None:
                    continue
                cap, group = self.caps[gi], self.groups[gi]
                pod, gpus = where
                reuse = all(cap.free[pod][g] < FRACTION_UNITS for g in gpus)
                left = sum(cap.free[pod][g] - need.units for g in gpus) * group.gpu_memory_bytes // FRACTION_UNITS
                options.append(((0, left) if reuse else (1, -group.gpu_memory_bytes), gi, need, where))
            if options:
                _, gi, need, where = min(options, key=lambda o: (o[0], o[1]))
                return gi, need, where
        return None

    def _spill(self, st: RequestState) -> bool:
        """One more replica in another group with free room and the same rank count (the replicas
        of one model run the same tensor-parallel plan); False when there is none."""
        assert st.need is not None
        for gi, need in self._feasible(st)[0]:
            if gi == st.group or need.gpus != st.need.gpus:
                continue
            where = self._fit(st, gi, need)
            if where is not None:
                self._allocate(st, gi, where, need)
                return True
        return False

    def _fit(self, st: RequestState, gi: int, need: Need) -> tuple[int, tuple[int, ...]] | None:
        cap = self.caps[gi]
        if need.shared:
            # Replicas of one model on one GPU would share its failure and its compute: spread them.
            avoid = {(s.pod, s.gpus[0]) for s in st.slots.values() if s.group == gi}
            found = cap.tightest_gpu(need.units, avoid)
            return None if found is None else (found[0], (found[1],))
        if need.whole:
            return cap.whole_gpus(need.gpus)
        return cap.tightest_gpus(need.gpus, need.units)

    def _allocate(
        self, st: RequestState, gi: int, where: tuple[int, tuple[int, ...]], need: Need | None = None
    ) -> None:
        need = need or st.need
        assert need is not None
        number = st.next_replica
        st.next_replica += 1
        pod, gpus = where
        self.caps[gi].allocate((st.req.key, number), pod, gpus, need.units)
        st.slots[number] = Slot(gi, pod, gpus, need.units, incumbent=False)

    # --- phase 2b: re-pack ----------------------------------------------------------------------

    def repack_new(self) -> None:
        """Re-pack this plan's new replicas (kept ones stay) with the bounded search of repack.py:
        first to add replicas the placement pass left out (one at a time, in placement order, so
        priorities hold), then to use fewer GPUs. Keeps the placement pass's packing otherwise."""
        placed = [(st, number) for st in self.states.values() for number, slot in sorted(st.slots.items())
                  if not slot.incumbent]
        if not placed or len(placed) > repack.MAX_PIECES:
            return
        free = [[list(pod) for pod in cap.free] for cap in self.caps]
        for st, number in placed:
            slot = st.slots[number]
            for gpu in slot.gpus:
                free[slot.group][slot.pod][gpu] += slot.units
        found: dict[repack.PieceId, repack.Spot] | None = None
        attempts = repack.ATTEMPTS
        for st in sorted((s for s in self.states.values() if s.missing > 0), key=lambda s: s.order):
            for extra in range(st.missing):
                if attempts == 0 or len(placed) == repack.MAX_PIECES:
                    break
                attempts -= 1
                more = [*placed, (st, st.next_replica + extra)]
                pieces = self._pieces(more)
                got = None if not pieces[-1].options else repack.repack(
                    self.groups, free, pieces, steps=repack.ATTEMPT_STEPS, first=True)
                if got is None:
                    break
                placed, found = more, got
        fewer = repack.repack(self.groups, free, self._pieces(placed),
                              beat=self.gpus_used() if found is None else self._used_with(free, found))
        found = fewer or found
        if found is not None:
            self._adopt(placed, found)

    def _pieces(self, placed: list[tuple[RequestState, int]]) -> list[repack.Piece]:
        pieces = []
        for st, number in placed:
            kept = [s for s in st.slots.values() if s.incumbent]
            # A model with kept replicas keeps their rank count; others may take any count.
            options = tuple((gi, need) for gi, need in self._feasible(st)[0]
                            if not kept or st.need is None or need.gpus == st.need.gpus)
            avoid = frozenset((s.group, s.pod, g) for s in kept for g in s.gpus)
            pieces.append(repack.Piece(st.req.key, number, options, avoid))
        return pieces

    @staticmethod
    def _used_with(free: list[list[list[int]]], found: dict[repack.PieceId, repack.Spot]) -> int:
        touched = {(s.group, s.pod, g) for s in found.values() for g in s.gpus}
        return len(touched) + sum(1 for gi, pods in enumerate(free) for pod, gpus in enumerate(pods)
                                  for gpu, units in enumerate(gpus)
                                  if units < FRACTION_UNITS and (gi, pod, gpu) not in touched)

    def _adopt(self, placed: list[tuple[RequestState, int]], found: dict[repack.PieceId, repack.Spot]) -> None:
        for st, number in placed:
            slot = st.slots.pop(number, None)
            if slot is not None:
                self.caps[slot.group].release((st.req.key, number), slot.pod, slot.gpus)
        for st, number in placed:
            spot = found[(st.req.key, number)]
            self.caps[spot.group].allocate((st.req.key, number), spot.pod, spot.gpus, spot.units)
            st.slots[number] = Slot(spot.group, spot.pod, spot.gpus, spot.units, incumbent=False)
            st.next_replica = max(st.next_replica, number + 1)
        for st in {st.req.key: st for st, _ in placed}.values():
            if not any(slot.incumbent for slot in st.slots.values()):
                # A model with no kept replica belongs to the group of its first replica.
                st.group = st.slots[min(st.slots)].group
                need = self.need(st.req, st.group)
                assert not isinstance(need, str)
                st.need = need

    def gpus_used(self) -> int:
        return sum(1 for cap in self.caps for pod in cap.free for f in pod if f < FRACTION_UNITS)

    def _shortage(self, st: RequestState, groups: list[int]) -> str:
        parts = []
        for gi in groups:
            need = self.need(st.req, gi)
            cap, group = self.caps[gi], self.groups[gi]
            if isinstance(need, str):
                parts.append(need)
            elif need.shared:
                most = cap.most_free_units() * group.gpu_memory_bytes // FRACTION_UNITS
                parts.append(
                    f"needs {human_bytes(st.req.total_bytes or 0)} on one GPU;"
                    f" the most free on a {group.name} GPU is {human_bytes(most)}"
                )
            elif need.whole:
                parts.append(
                    f"needs {need.gpus}x{human_bytes(group.gpu_memory_bytes)} GPUs in one pod;"
                    f" largest free in {group.name} is {cap.largest_whole_free()}"
                )
            else:
                per_gpu = need.units * group.gpu_memory_bytes // FRACTION_UNITS
                parts.append(
                    f"needs {need.gpus} GPUs with {human_bytes(per_gpu)} free each in one pod;"
                    f" the most in one {group.name} pod is {cap.most_gpus_with(need.units)}"
                )
        return "; ".join(parts)


def plan(
    inventory: Inventory,
    requests: Sequence[PlacementRequest],
    *,
    now: datetime,
    whole_gpu_tensor_parallel: bool = False,
    auto_tensor_parallel_sizes: tuple[int, ...] = TP_SIZES,
    schedule: Schedule | None = None,
) -> Plan:
    """Grant each request a level and a placement; deterministic and stable (see module doc).

    `schedule` is the calendar's bookings (docs/calendar.md): a model booked at `now` is planned
    dedicated Hot whatever its request says; its request is otherwise unchanged.

    `whole_gpu_tensor_parallel=True` gives each tensor-parallel rank a whole GPU (isolation: no
    other model on a TP replica's GPUs). The default gives each rank only its memory share, so the
    rest of those GPUs packs small models and other ranks; the runtime caps every process's CUDA
    allocator to its share, so a neighbour cannot take a rank's memory.

    `auto_tensor_parallel_sizes` are the rank counts `tensorParallelSize: auto` may pick, smallest
    first: true tensor parallelism splits attention heads, hence (1, 2, 4, 8); a runtime that
    splits layers instead (pipeline) can run any count, e.g. (1, 2, ..., 8), which wastes less
    (docs/placement.md, docs/benchmarks.md).
    """
    requests = apply_schedule(requests, schedule, now)
    planner = _Planner(inventory, requests, now, whole_gpu_tensor_parallel, auto_tensor_parallel_sizes)
    planner.keep_current()
    planner.place_missing()
    planner.repack_new()
    place_warm(planner.groups, planner.group_index, planner.states)
    decider = Decider(planner.groups, planner.states, now, planner.need)
    decisions = [decider.decide(st) for st in planner.states.values()]
    return summary(inventory, planner.states, decisions, planner.gpus_used())

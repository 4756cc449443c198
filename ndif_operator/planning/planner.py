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
3. When nothing is free, evict: a dedicated request may evict any non-dedicated model; otherwise
   only models of lower priority, or of equal priority that opted into time sharing
   (minimumDeploymentSeconds > 0) and have been HOT at least that long. Only placements carried
   over from the previous plan are evicted (never one made in this plan), so the search ends.
   The cheapest location wins: fewest victims, then lowest victim priority, then least memory.
4. Re-pack what this plan placed (repack.py): a bounded search moves only the replicas placed in
   this plan, to add replicas step 2 left out (in placement order) and then to use fewer GPUs.
5. What is not HOT goes WARM in CPU RAM when the request allows it and a pod has room
   (preferring the pod it is already in, or was HOT in), else COLD; a higher-priority (or
   dedicated) model may send lower-priority WARM models to COLD to make room. Every such decision
   says why.

Everything is sorted before use so the same input gives the same plan byte for byte, whatever
the order of `requests`.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from ndif_operator.api import Level, Reason
from ndif_operator.api.units import human_bytes
from ndif_operator.planning import repack
from ndif_operator.planning.capacity import CpuCapacity, GroupCapacity, SlotId
from ndif_operator.planning.schedule import apply_schedule
from ndif_operator.planning.sizing import TP_SIZES, Need, check_tp_sizes, impossible_tensor_parallel_size, need_in
from ndif_operator.planning.types import (
    FRACTION_UNITS,
    CurrentPlacement,
    Decision,
    Inventory,
    PlacementRequest,
    Plan,
    ReplicaPlacement,
)
from ndif_operator.scheduling.bookings import Schedule

_Order = tuple[int, int, int, int, str]


@dataclass(slots=True)
class _Slot:
    group: int
    pod: int
    gpus: tuple[int, ...]
    units: int
    incumbent: bool  # carried over from the current placement (the only kind that may be evicted)


@dataclass(slots=True)
class _State:
    req: PlacementRequest
    order: _Order
    group: int | None = None
    need: Need | None = None
    slots: dict[int, _Slot] = field(default_factory=dict)
    next_replica: int = 0
    evicted_by: str | None = None
    why_short: str = ""  # why not every wanted replica was placed
    warm_at: tuple[int, int] | None = None  # (group index, pod) of the WARM copy
    warm_evicted_by: str | None = None  # displaced from CPU RAM by a higher-priority model

    @property
    def wants_hot(self) -> bool:
        return self.req.level == Level.HOT and self.req.total_bytes is not None and self.req.replicas > 0

    @property
    def missing(self) -> int:
        return self.req.replicas - len(self.slots) if self.wants_hot else 0


def _warm_bytes(req: PlacementRequest) -> int:
    """CPU RAM a WARM copy holds: the weights (the runtime budget is only needed on a GPU)."""
    return req.weights_bytes if req.weights_bytes is not None else req.total_bytes or 0


def _order(req: PlacementRequest) -> _Order:
    was_hot = req.current is not None and req.current.level == Level.HOT
    return (0 if req.dedicated else 1, -req.priority, 0 if was_hot else 1, -(req.total_bytes or 0), req.key)


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
        self.states = {r.key: _State(req=r, order=_order(r)) for r in sorted(requests, key=lambda r: r.key)}
        # group index → slot → state key, for the placements eviction may take back
        self.incumbents: list[dict[int, dict[SlotId, str]]] = [{} for _ in self.groups]  # by priority
        # (group, priority, dedicated) of requests that found no evictable placement: the set of
        # incumbents only shrinks during a plan, so they never will (keeps full clusters fast).
        self.no_victims: set[tuple[int, int, bool]] = set()
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
            need = self._need(st.req, gi)
            if isinstance(need, str):
                continue
            st.group, st.need = gi, need
            st.next_replica = len(cur.replicas)
            for number, rp in enumerate(cur.replicas[: st.req.replicas]):
                slot_group = self.group_index.get(rp.group) if rp.group is not None else gi
                if slot_group is None:
                    continue
                slot_need = need if slot_group == gi else self._need(st.req, slot_group)
                cap = self.caps[slot_group]
                if isinstance(slot_need, str) or slot_need.gpus != need.gpus or not self._slot_fits(cap, rp, slot_need):
                    continue
                slot = _Slot(slot_group, rp.pod, rp.gpus, slot_need.units, incumbent=True)
                cap.allocate((st.req.key, number), rp.pod, rp.gpus, slot_need.units)
                st.slots[number] = slot
                self.incumbents[slot_group].setdefault(st.req.priority, {})[(st.req.key, number)] = st.req.key
            if not st.slots:
                st.group = st.need = None

    def _need(self, req: PlacementRequest, gi: int) -> Need | str:
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

    def _place(self, st: _State) -> list[str]:
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
            where = where or self._evict_for(st, st.group, need, evicted)
            if where is None:
                st.why_short = self._shortage(st, [st.group])
                break
            self._allocate(st, st.group, where)
        return evicted

    def _feasible(self, st: _State) -> tuple[list[tuple[int, Need]], list[str]]:
        """Groups that can hold a replica, best first: the fewest GPUs per replica (one larger GPU
        over several small ones), then the smallest GPUs that hold it (big GPUs stay free for
        the models that need them); and why the others cannot."""
        feasible: list[tuple[int, Need]] = []
        reasons: list[str] = []
        for gi in self.group_pref:
            need = self._need(st.req, gi)
            if isinstance(need, str):
                reasons.append(need)
            else:
                feasible.append((gi, need))
        feasible.sort(key=lambda item: item[1].gpus)  # stable: GPU size order within a count
        return feasible, reasons

    def _choose_group(self, st: _State, evicted: list[str]) -> bool:
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
            where = self._evict_for(st, gi, need, evicted)
            if where is not None:
                self._allocate(st, gi, where)
                return True
        st.group = st.need = None
        st.why_short = self._shortage(st, [gi for gi, _ in feasible])
        return False

    def _best_free_fit(self, st: _State, feasible: list[tuple[int, Need]]
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

    def _spill(self, st: _State) -> bool:
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

    def _fit(self, st: _State, gi: int, need: Need) -> tuple[int, tuple[int, ...]] | None:
        cap = self.caps[gi]
        if need.shared:
            # Replicas of one model on one GPU would share its failure and its compute: spread them.
            avoid = {(s.pod, s.gpus[0]) for s in st.slots.values() if s.group == gi}
            found = cap.tightest_gpu(need.units, avoid)
            return None if found is None else (found[0], (found[1],))
        if need.whole:
            return cap.whole_gpus(need.gpus)
        return cap.tightest_gpus(need.gpus, need.units)

    def _allocate(self, st: _State, gi: int, where: tuple[int, tuple[int, ...]], need: Need | None = None) -> None:
        need = need or st.need
        assert need is not None
        number = st.next_replica
        st.next_replica += 1
        pod, gpus = where
        self.caps[gi].allocate((st.req.key, number), pod, gpus, need.units)
        st.slots[number] = _Slot(gi, pod, gpus, need.units, incumbent=False)

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

    def _pieces(self, placed: list[tuple[_State, int]]) -> list[repack.Piece]:
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

    def _adopt(self, placed: list[tuple[_State, int]], found: dict[repack.PieceId, repack.Spot]) -> None:
        for st, number in placed:
            slot = st.slots.pop(number, None)
            if slot is not None:
                self.caps[slot.group].release((st.req.key, number), slot.pod, slot.gpus)
        for st, number in placed:
            spot = found[(st.req.key, number)]
            self.caps[spot.group].allocate((st.req.key, number), spot.pod, spot.gpus, spot.units)
            st.slots[number] = _Slot(spot.group, spot.pod, spot.gpus, spot.units, incumbent=False)
            st.next_replica = max(st.next_replica, number + 1)
        for st in {st.req.key: st for st, _ in placed}.values():
            if not any(slot.incumbent for slot in st.slots.values()):
                # A model with no kept replica belongs to the group of its first replica.
                st.group = st.slots[min(st.slots)].group
                need = self._need(st.req, st.group)
                assert not isinstance(need, str)
                st.need = need

    def gpus_used(self) -> int:
        return sum(1 for cap in self.caps for pod in cap.free for f in pod if f < FRACTION_UNITS)

    # --- eviction -----------------------------------------------------------------------------

    def _time_shared_out(self, victim: _State) -> bool:
        """An equal-priority model may be evicted once it has been HOT for its minimum time (if any)."""
        v = victim.req
        if v.minimum_deployment_seconds <= 0:
            return False
        since = v.current.since if v.current is not None else None
        return since is None or (self.now - since).total_seconds() >= v.minimum_deployment_seconds

    def _candidates(self, by: PlacementRequest, gi: int) -> dict[SlotId, str]:
        """Incumbent slots of group `gi` that `by` may evict (see the module doc, rule 3)."""
        memo = (gi, by.priority, by.dedicated)
        if memo in self.no_victims:
            return {}
        found: dict[SlotId, str] = {}
        for priority, slots in self.incumbents[gi].items():
            if by.dedicated or priority < by.priority:
                found.update((s, k) for s, k in slots.items() if not self.states[k].req.dedicated)
            elif priority == by.priority:
                found.update((s, k) for s, k in slots.items()
                              if not self.states[k].req.dedicated and self._time_shared_out(self.states[k]))
        if not found:
            self.no_victims.add(memo)
        return {s: k for s, k in found.items() if k != by.key}

    def _evict_for(
        self, st: _State, gi: int, need: Need, evicted: list[str]
    ) -> tuple[int, tuple[int, ...]] | None:
        cap = self.caps[gi]
        candidates = self._candidates(st.req, gi)
        if not candidates:
            return None
        prio = {slot: self.states[key].req.priority for slot, key in candidates.items()}
        avoid = {(s.pod, s.gpus[0]) for s in st.slots.values() if s.group == gi} if need.shared else set()
        best: tuple[tuple[int, int, int], int, tuple[int, ...], set[SlotId]] | None = None
        if need.shared:
            # Fast path: the cheapest single victim (lowest priority, then least memory) whose
            # GPU then holds the replica; no other choice can cost less.
            def single_cost(slot: SlotId) -> tuple[int, int, SlotId]:
                held = self.states[slot[0]].slots[slot[1]]
                return (prio[slot], held.units * len(held.gpus), slot)

            for slot in sorted(candidates, key=single_cost):
                held = self.states[slot[0]].slots[slot[1]]
                gpu = next((g for g in held.gpus if (held.pod, g) not in avoid
                            and cap.free[held.pod][g] + cap.occupants[held.pod][g][slot] >= need.units), None)
                if gpu is not None:
                    best = ((1, prio[slot], held.units * len(held.gpus)), held.pod, (gpu,), {slot})
                    break
        # Only GPUs holding a candidate can change; whole free GPUs count too for multi-GPU needs.
        touched: dict[int, set[int]] = {}
        for slot, key in candidates.items() if best is None else ():
            held = self.states[key].slots[slot[1]]
            touched.setdefault(held.pod, set()).update(held.gpus)
        for pod in sorted(touched):
            options: list[tuple[tuple[int, int, int], int, set[SlotId]]] = []  # (cost, gpu, victims)
            scan = range(cap.group.gpus_per_pod) if not need.shared else sorted(touched[pod])
            for gpu in scan:
                if (pod, gpu) in avoid:
                    continue
                free, occupants = cap.free[pod][gpu], cap.occupants[pod][gpu]
                target = need.units
                if free >= target:
                    options.append(((0, -(10**6), 0), gpu, set()))
                    continue
                chosen: set[SlotId] = set()
                # Cheapest victims first: lowest priority, then the ones freeing the most room.
                for slot in sorted(
                    (s for s in occupants if s in candidates), key=lambda s: (prio[s], -occupants[s], s)
                ):
                    chosen.add(slot)
                    free += occupants[slot]
                    if free >= target:
                        break
                if free >= target:
                    cost = (len(chosen), max(prio[s] for s in chosen), sum(occupants[s] for s in chosen))
                    options.append((cost, gpu, chosen))
            if len(options) < need.gpus:
                continue
            options.sort(key=lambda o: (o[0], o[1]))
            picked = options[: need.gpus]
            victims: set[SlotId] = set().union(*(o[2] for o in picked))
            cost = (
                len(victims),
                max((prio[s] for s in victims), default=-(10**6)),
                sum(self.states[s[0]].slots[s[1]].units * len(self.states[s[0]].slots[s[1]].gpus) for s in victims),
            )
            gpus = tuple(sorted(o[1] for o in picked))
            if best is None or (cost, pod) < (best[0], best[1]):
                best = (cost, pod, gpus, victims)
        if best is None:
            return None
        _, pod, gpus, victims = best
        for slot in sorted(victims):
            key, number = slot
            victim = self.states[key]
            taken = victim.slots.pop(number)
            cap.release(slot, taken.pod, taken.gpus)
            del self.incumbents[gi][victim.req.priority][slot]
            victim.evicted_by = st.req.key
            if not victim.slots:
                # Everything it had is gone: it may land in another group when re-placed.
                victim.group = victim.need = None
            if key not in evicted:
                evicted.append(key)
        return pod, gpus

    def _shortage(self, st: _State, groups: list[int]) -> str:
        parts = []
        for gi in groups:
            need = self._need(st.req, gi)
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

    # --- phase 3: warm ------------------------------------------------------------------------

    def place_warm(self) -> None:
        cpu = CpuCapacity.empty(self.groups)
        wanting = [
            st
            for st in self.states.values()
            if st.req.total_bytes is not None
            and st.req.level in (Level.HOT, Level.WARM)
            and not (st.wants_hot and st.slots)
            and not (st.req.level == Level.HOT and st.req.replicas == 0)
        ]

        def previous_pod(st: _State) -> tuple[int, int] | None:
            cur = st.req.current
            if cur is None or cur.worker_group is None or not cur.replicas:
                return None
            gi = self.group_index.get(cur.worker_group)
            return None if gi is None else (gi, cur.replicas[0].pod)

        def is_warm(st: _State) -> bool:
            return st.req.current is not None and st.req.current.level == Level.WARM

        holders: dict[tuple[int, int], list[_State]] = {}  # pod → states WARM there, in this plan

        def hold(st: _State, where: tuple[int, int]) -> None:
            st.warm_at = where
            holders.setdefault(where, []).append(st)

        # Models already WARM keep their pod first (stability), then the rest by the usual order.
        for st in sorted(wanting, key=lambda s: (0 if is_warm(s) else 1, s.order)):
            need = _warm_bytes(st.req)
            prev = previous_pod(st)
            if prev is not None and cpu.take(prev, need):
                hold(st, prev)
                continue
            where = cpu.tightest(need)
            if where is not None and cpu.take(where, need):
                hold(st, where)
                continue
            where = self._evict_warm_for(st, need, cpu, holders)
            if where is not None and cpu.take(where, need):
                hold(st, where)

    def _evict_warm_for(
        self, st: _State, need: int, cpu: CpuCapacity, holders: dict[tuple[int, int], list[_State]]
    ) -> tuple[int, int] | None:
        """Make CPU room by sending lower-priority WARM models to COLD (fewest victims wins)."""

        def evictable(v: _State) -> bool:
            return not v.req.dedicated and (v.req.priority < st.req.priority or st.req.dedicated)

        best: tuple[tuple[int, int, int], tuple[int, int], list[_State]] | None = None
        for where in sorted(holders):
            free, victims = cpu.free[where], []
            # Lowest priority first, then the largest (fewer victims).
            for v in sorted(filter(evictable, holders[where]), key=lambda v: (v.req.priority, -_warm_bytes(v.req),
                                                                              v.req.key)):
                if free >= need:
                    break
                victims.append(v)
                free += _warm_bytes(v.req)
            if free >= need and victims:
                cost = (len(victims), max(v.req.priority for v in victims), sum(_warm_bytes(v.req) for v in victims))
                if best is None or (cost, where) < (best[0], best[1]):
                    best = (cost, where, victims)
        if best is None:
            return None
        _, where, victims = best
        for v in victims:
            holders[where].remove(v)
            cpu.give(where, _warm_bytes(v.req))
            v.warm_at = None
            v.warm_evicted_by = st.req.key
        return where

    # --- output -------------------------------------------------------------------------------

    def decisions(self) -> list[Decision]:
        return [self._decide(st) for st in self.states.values()]

    def _decide(self, st: _State) -> Decision:
        req, cur = st.req, st.req.current
        if req.total_bytes is None:
            return self._decision(st, Level.COLD, Reason.ESTIMATE_PENDING, "not sized yet: waiting for an estimate")
        if req.level == Level.HOT and req.replicas == 0:
            return self._decision(st, Level.HOT, Reason.PLACED_HOT, "0 replicas requested")
        if st.wants_hot and st.slots:
            assert st.group is not None and st.need is not None
            by_group: dict[int, int] = {}
            for slot in st.slots.values():
                by_group[slot.group] = by_group.get(slot.group, 0) + 1
            msg = ", ".join(
                f"{n} replica{'s' if n > 1 else ''} on {self.groups[gi].name}"
                f" ({self._slot_need(st, gi).describe()} each)"
                for gi, n in sorted(by_group.items(), key=lambda item: (item[0] != st.group, item[0])))
            if st.missing > 0:
                msg = f"{len(st.slots)} of {req.replicas} replicas placed: {st.why_short}"
            moves = self._moves(st)
            if moves:
                return self._decision(st, Level.HOT, Reason.MOVED, f"{moves}; {msg}")
            return self._decision(st, Level.HOT, Reason.PLACED_HOT, msg)
        level = Level.WARM if st.warm_at is not None else Level.COLD
        where = f"kept {level.value}" if level == Level.WARM else "Cold: no pod has CPU RAM for its weights"
        if st.warm_evicted_by is not None:
            evictor = self.states[st.warm_evicted_by].req
            where = f"Cold: its CPU RAM went to {evictor.key} (priority {evictor.priority})"
            if req.level == Level.WARM or (cur is not None and cur.level == Level.WARM):
                return self._decision(st, level, Reason.EVICTED, where)
        if req.level == Level.WARM:
            if level == Level.WARM:
                return self._decision(st, level, Reason.PLACED_WARM, "weights held in CPU RAM")
            return self._decision(st, level, Reason.INSUFFICIENT_MEMORY, where)
        if req.level == Level.COLD:
            return self._decision(st, Level.COLD, Reason.PLACED_COLD, "on disk / object store, as requested")
        was_hot_here = cur is not None and cur.level == Level.HOT
        if st.evicted_by is not None and was_hot_here:
            assert cur is not None
            evictor = self.states[st.evicted_by].req
            msg = f"evicted by {evictor.key} (priority {evictor.priority}"
            msg += ", dedicated)" if evictor.dedicated else ")"
            gone = "; ".join(rp.where(cur.worker_group) for rp in cur.replicas)
            return self._decision(st, level, Reason.EVICTED, f"{msg} from {gone}; {where}")
        reason = Reason.INSUFFICIENT_GPU if level == Level.WARM else Reason.INSUFFICIENT_MEMORY
        if impossible_tensor_parallel_size(req):  # no cluster can fix it: the spec must change
            reason = Reason.INVALID_SPEC
        return self._decision(st, level, reason, f"{st.why_short}; {where}")

    def _decision(self, st: _State, level: Level, reason: Reason, message: str) -> Decision:
        req, cur = st.req, st.req.current
        group_name: str | None = None
        assignments: tuple[ReplicaPlacement, ...] = ()
        gpus_per_replica, fraction, replicas = 0.0, 0.0, 0
        if level == Level.HOT and st.slots:
            assert st.group is not None and st.need is not None
            group_name = self.groups[st.group].name
            fraction = st.need.fraction
            gpus_per_replica = st.need.total_units / FRACTION_UNITS  # the sum of the ranks' shares
            assignments = tuple(
                ReplicaPlacement(pod=s.pod, gpus=s.gpus, fraction=s.units / FRACTION_UNITS,
                                 group=None if s.group == st.group else self.groups[s.group].name)
                for _, s in sorted(st.slots.items())
            )
            replicas = len(assignments)
        elif level == Level.WARM and st.warm_at is not None:
            group_name = self.groups[st.warm_at[0]].name
            assignments = (ReplicaPlacement(pod=st.warm_at[1], gpus=(), fraction=0.0),)
        moved = self._moved(st, level, group_name, assignments, cur)
        same_level = cur is not None and cur.level == level
        since = cur.since if same_level and not moved and cur is not None and cur.since is not None else self.now
        return Decision(
            key=req.key,
            level=level,
            replicas=replicas,
            gpus_per_replica=gpus_per_replica,
            gpu_fraction=fraction,
            worker_group=group_name,
            assignments=assignments,
            reason=reason,
            message=message,
            since=since,
            moved=moved,
        )

    def _slot_need(self, st: _State, gi: int) -> Need:
        assert st.need is not None
        if gi == st.group:
            return st.need
        need = self._need(st.req, gi)
        assert not isinstance(need, str)
        return need

    def _moves(self, st: _State) -> str:
        """'replica 1 moved from h100 pod 0 GPU 3 to h100 pod 1 GPU 2 (why)', for every replica of
        the current placement that this plan took away while the model stays Hot; '' if none."""
        cur = st.req.current
        if cur is None or cur.level != Level.HOT or cur.worker_group is None:
            return ""
        kept = {number for number, slot in st.slots.items() if slot.incumbent}
        lost = [(n, rp) for n, rp in enumerate(cur.replicas[: st.req.replicas]) if n not in kept]
        if not lost:
            return ""
        new = sorted((n, slot) for n, slot in st.slots.items() if not slot.incumbent)
        if st.evicted_by is not None:
            evictor = self.states[st.evicted_by].req
            why = f"evicted by {evictor.key} (priority {evictor.priority})"
        elif cur.worker_group not in self.group_index:
            why = f"worker group {cur.worker_group} is no longer in the inventory"
        elif st.need is not None and any(round(rp.fraction * FRACTION_UNITS) != st.need.units for _, rp in lost):
            why = "its estimate changed, so its GPU share did"
        else:
            why = "its GPUs are no longer in the inventory or taken by a replica placed first"
        parts = []
        for index, (number, rp) in enumerate(lost):
            target = new[index][1] if index < len(new) else None
            to = (f"{self.groups[target.group].name} pod {target.pod} GPU{'s' if len(target.gpus) > 1 else ''} "
                  f"{','.join(map(str, target.gpus))}" if target is not None else "nowhere (not re-placed)")
            parts.append(f"replica {number} moved from {rp.where(cur.worker_group)} to {to}")
        return f"{'; '.join(parts)} ({why})"

    @staticmethod
    def _moved(
        st: _State,
        level: Level,
        group_name: str | None,
        assignments: tuple[ReplicaPlacement, ...],
        cur: CurrentPlacement | None,
    ) -> bool:
        """Did this plan take away a placement the request still wants? (Promotions are not moves.)"""
        if cur is None:
            return False
        if cur.level == Level.HOT:
            if not st.wants_hot:
                return False  # the spec no longer asks for it
            kept = sum(1 for s in st.slots.values() if s.incumbent)
            return kept < min(len(cur.replicas), st.req.replicas)
        if cur.level == Level.WARM:
            if level == Level.HOT or st.req.level == Level.COLD:
                return False
            return level != Level.WARM or group_name != cur.worker_group or assignments[:1] != cur.replicas[:1]
        return False

    def summary(self, decisions: list[Decision]) -> Plan:
        used = self.gpus_used()
        reserved = sum(d.replicas * (self.states[d.key].req.total_bytes or 0) for d in decisions)
        return Plan(
            decisions=tuple(decisions),
            gpus_total=self.inventory.total_gpus,
            gpus_used=used,
            gpu_memory_reserved_bytes=reserved,
            moves=sum(1 for d in decisions if d.moved),
        )


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
    planner.place_warm()
    return planner.summary(planner.decisions())

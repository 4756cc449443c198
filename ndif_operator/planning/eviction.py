"""Rule 3 of the planner: which placed replicas a request may evict, and the cheapest set to evict.

Only placements carried over from the previous plan (incumbents) are ever evicted, never one made
in this plan, so placement ends. A dedicated request may evict any non-dedicated model; others
only models of lower priority, or of equal priority that opted into time sharing and have been
HOT at least their minimum time. The cheapest location wins: fewest victims, then lowest victim
priority, then least memory.
"""

from __future__ import annotations

from datetime import datetime

from ndif_operator.planning.capacity import GroupCapacity, SlotId
from ndif_operator.planning.plan_state import RequestState
from ndif_operator.planning.sizing import Need
from ndif_operator.planning.types import PlacementRequest


class Eviction:
    """The incumbents of one plan by group and priority, and evictions among them."""

    def __init__(self, caps: list[GroupCapacity], states: dict[str, RequestState], now: datetime) -> None:
        self.caps = caps
        self.states = states
        self.now = now
        # group index → priority → slot → state key, for the placements eviction may take back
        self.incumbents: list[dict[int, dict[SlotId, str]]] = [{} for _ in caps]
        # (group, priority, dedicated) of requests that found no evictable placement: the set of
        # incumbents only shrinks during a plan, so they never will (keeps full clusters fast).
        self.no_victims: set[tuple[int, int, bool]] = set()

    def add_incumbent(self, gi: int, priority: int, slot: SlotId, key: str) -> None:
        self.incumbents[gi].setdefault(priority, {})[slot] = key

    def time_shared_out(self, victim: RequestState) -> bool:
        """An equal-priority model may be evicted once it has been HOT for its minimum time (if any)."""
        v = victim.req
        if v.minimum_deployment_seconds <= 0:
            return False
        since = v.current.since if v.current is not None else None
        return since is None or (self.now - since).total_seconds() >= v.minimum_deployment_seconds

    def candidates(self, by: PlacementRequest, gi: int) -> dict[SlotId, str]:
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
                              if not self.states[k].req.dedicated and self.time_shared_out(self.states[k]))
        if not found:
            self.no_victims.add(memo)
        return {s: k for s, k in found.items() if k != by.key}

    def evict_for(
        self, st: RequestState, gi: int, need: Need, evicted: list[str]
    ) -> tuple[int, tuple[int, ...]] | None:
        cap = self.caps[gi]
        candidates = self.candidates(st.req, gi)
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

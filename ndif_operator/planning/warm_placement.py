"""Rule 5 of the planner: which models not HOT are held WARM in a pod's CPU RAM, and which go COLD."""

from __future__ import annotations

from ndif_operator.api import Level
from ndif_operator.planning.capacity import CpuCapacity
from ndif_operator.planning.plan_state import RequestState, warm_bytes
from ndif_operator.planning.types import WorkerGroup


def place_warm(groups: tuple[WorkerGroup, ...], group_index: dict[str, int], states: dict[str, RequestState]) -> None:
    """Rule 5: hold what is not HOT WARM in a pod's CPU RAM where the request allows it and there is
    room (a model already WARM keeps its pod), else it goes COLD; a higher-priority (or dedicated)
    model may send lower-priority WARM models to COLD to make room."""
    cpu = CpuCapacity.empty(groups)
    wanting = [
        st
        for st in states.values()
        if st.req.total_bytes is not None
        and st.req.level in (Level.HOT, Level.WARM)
        and not (st.wants_hot and st.slots)
        and not (st.req.level == Level.HOT and st.req.replicas == 0)
    ]

    def previous_pod(st: RequestState) -> tuple[int, int] | None:
        cur = st.req.current
        if cur is None or cur.worker_group is None or not cur.replicas:
            return None
        gi = group_index.get(cur.worker_group)
        return None if gi is None else (gi, cur.replicas[0].pod)

    def is_warm(st: RequestState) -> bool:
        return st.req.current is not None and st.req.current.level == Level.WARM

    holders: dict[tuple[int, int], list[RequestState]] = {}  # pod → states WARM there, in this plan

    def hold(st: RequestState, where: tuple[int, int]) -> None:
        st.warm_at = where
        holders.setdefault(where, []).append(st)

    # Models already WARM keep their pod first (stability), then the rest by the usual order.
    for st in sorted(wanting, key=lambda s: (0 if is_warm(s) else 1, s.order)):
        need = warm_bytes(st.req)
        prev = previous_pod(st)
        if prev is not None and cpu.take(prev, need):
            hold(st, prev)
            continue
        where = cpu.tightest(need)
        if where is not None and cpu.take(where, need):
            hold(st, where)
            continue
        where = _evict_warm_for(st, need, cpu, holders)
        if where is not None and cpu.take(where, need):
            hold(st, where)

def _evict_warm_for(
    st: RequestState, need: int, cpu: CpuCapacity, holders: dict[tuple[int, int], list[RequestState]]
) -> tuple[int, int] | None:
    """Make CPU room by sending lower-priority WARM models to COLD (fewest victims wins)."""

    def evictable(v: RequestState) -> bool:
        return not v.req.dedicated and (v.req.priority < st.req.priority or st.req.dedicated)

    best: tuple[tuple[int, int, int], tuple[int, int], list[RequestState]] | None = None
    for where in sorted(holders):
        free, victims = cpu.free[where], []
        # Lowest priority first, then the largest (fewer victims).
        for v in sorted(filter(evictable, holders[where]), key=lambda v: (v.req.priority, -warm_bytes(v.req),
                                                                          v.req.key)):
            if free >= need:
                break
            victims.append(v)
            free += warm_bytes(v.req)
        if free >= need and victims:
            cost = (len(victims), max(v.req.priority for v in victims), sum(warm_bytes(v.req) for v in victims))
            if best is None or (cost, where) < (best[0], best[1]):
                best = (cost, where, victims)
    if best is None:
        return None
    _, where, victims = best
    for v in victims:
        holders[where].remove(v)
        cpu.give(where, warm_bytes(v.req))
        v.warm_at = None
        v.warm_evicted_by = st.req.key
    return where

# --- output -------------------------------------------------------------------------------

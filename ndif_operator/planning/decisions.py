"""The planner's output: each request's decision (level, placement, reason, message) and the plan.

Every decision says why: where a HOT model's replicas are and what each takes, which replica moved
and why, who evicted it, why a model is WARM or COLD rather than HOT.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from ndif_operator.api import Level, Reason
from ndif_operator.planning.plan_state import RequestState
from ndif_operator.planning.sizing import Need, impossible_tensor_parallel_size
from ndif_operator.planning.types import (
    FRACTION_UNITS,
    CurrentPlacement,
    Decision,
    Inventory,
    PlacementRequest,
    Plan,
    ReplicaPlacement,
    WorkerGroup,
)


class Decider:
    """Turns the planner's final state into one `Decision` per request."""

    def __init__(
        self,
        groups: tuple[WorkerGroup, ...],
        states: dict[str, RequestState],
        now: datetime,
        need: Callable[[PlacementRequest, int], Need | str],
    ) -> None:
        self.groups = groups
        self.group_index = {g.name: i for i, g in enumerate(groups)}
        self.states = states
        self.now = now
        self.need = need  # a request's need in a group (the planner's sizing, with its options)

    def decide(self, st: RequestState) -> Decision:
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

    def _decision(self, st: RequestState, level: Level, reason: Reason, message: str) -> Decision:
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

    def _slot_need(self, st: RequestState, gi: int) -> Need:
        assert st.need is not None
        if gi == st.group:
            return st.need
        need = self.need(st.req, gi)
        assert not isinstance(need, str)
        return need

    def _moves(self, st: RequestState) -> str:
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
        st: RequestState,
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


def summary(inventory: Inventory, states: dict[str, RequestState], decisions: list[Decision], gpus_used: int) -> Plan:
    reserved = sum(d.replicas * (states[d.key].req.total_bytes or 0) for d in decisions)
    return Plan(
        decisions=tuple(decisions),
        gpus_total=inventory.total_gpus,
        gpus_used=gpus_used,
        gpu_memory_reserved_bytes=reserved,
        moves=sum(1 for d in decisions if d.moved),
    )

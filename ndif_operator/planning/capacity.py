"""Mutable bookkeeping of free GPU and CPU capacity while one plan is built.

Kept out of the planner's decision logic so that the planner reads as rules. Capacity is counted
in integers only: GPU shares in units of 1/FRACTION_UNITS of a GPU (a share is rounded *up* from
the memory a replica needs, so units never oversubscribe memory), CPU RAM in bytes.

Lookups are indexed so that a plan of thousands of deployments stays fast: a sorted list of
(free units, pod, gpu) answers "tightest GPU with at least u free" by bisection, and per-pod
counts of fully free GPUs, bucketed by count, answer "pod with the fewest whole free GPUs >= t".
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass, field

from ndif_operator.planning.types import FRACTION_UNITS, WorkerGroup

SlotId = tuple[str, int]  # (request key, replica number)


@dataclass(slots=True)
class GroupCapacity:
    group: WorkerGroup
    free: list[list[int]] = field(default_factory=list)  # [pod][gpu] free units
    occupants: list[list[dict[SlotId, int]]] = field(default_factory=list)  # [pod][gpu] slot → units
    by_free: list[tuple[int, int, int]] = field(default_factory=list)  # sorted (free, pod, gpu), free > 0
    whole_free: list[int] = field(default_factory=list)  # per pod: GPUs with nothing on them
    buckets: list[list[int]] = field(default_factory=list)  # [count] → sorted pods with that many whole free

    @classmethod
    def empty(cls, group: WorkerGroup) -> GroupCapacity:
        n, g = group.pods, group.gpus_per_pod
        cap = cls(group=group)
        cap.free = [[FRACTION_UNITS] * g for _ in range(n)]
        cap.occupants = [[{} for _ in range(g)] for _ in range(n)]
        cap.by_free = [(FRACTION_UNITS, p, i) for p in range(n) for i in range(g)] if g else []
        cap.whole_free = [g] * n
        cap.buckets = [[] for _ in range(g + 1)]
        cap.buckets[g] = list(range(n))
        return cap

    def _set_free(self, pod: int, gpu: int, new: int) -> None:
        old = self.free[pod][gpu]
        if old == new:
            return
        if old > 0:
            idx = bisect_left(self.by_free, (old, pod, gpu))
            del self.by_free[idx]
        if new > 0:
            insort(self.by_free, (new, pod, gpu))
        self.free[pod][gpu] = new
        was_whole, is_whole = old == FRACTION_UNITS, new == FRACTION_UNITS
        if was_whole != is_whole:
            count = self.whole_free[pod]
            bucket = self.buckets[count]
            del bucket[bisect_left(bucket, pod)]
            count += 1 if is_whole else -1
            self.whole_free[pod] = count
            insort(self.buckets[count], pod)

    def allocate(self, slot: SlotId, pod: int, gpus: tuple[int, ...], units: int) -> None:
        for gpu in gpus:
            if self.free[pod][gpu] < units:
                raise AssertionError(f"oversubscribed {self.group.name}/{pod}/{gpu}")  # planner bug
            self.occupants[pod][gpu][slot] = units
            self._set_free(pod, gpu, self.free[pod][gpu] - units)

    def release(self, slot: SlotId, pod: int, gpus: tuple[int, ...]) -> None:
        for gpu in gpus:
            units = self.occupants[pod][gpu].pop(slot)
            self._set_free(pod, gpu, self.free[pod][gpu] + units)

    def tightest_gpu(self, units: int, avoid: set[tuple[int, int]]) -> tuple[int, int] | None:
        """The GPU with the least free room that still holds `units` (best fit), lowest index on ties."""
        idx = bisect_left(self.by_free, (units, -1, -1))
        for _, pod, gpu in self.by_free[idx:]:
            if (pod, gpu) not in avoid:
                return pod, gpu
        return None

    def tightest_gpus(self, count: int, units: int) -> tuple[int, tuple[int, ...]] | None:
        """`count` distinct GPUs of one pod with at least `units` free each, for TP ranks that hold
        a share of their GPUs. GPUs are scanned tightest first and the first pod to gather `count`
        wins: its roomiest pick is the tightest possible, so partly used GPUs fill before empty ones.
        """
        if count == 1:
            found = self.tightest_gpu(units, set())
            return None if found is None else (found[0], (found[1],))
        per_pod: dict[int, list[int]] = {}
        for _, pod, gpu in self.by_free[bisect_left(self.by_free, (units, -1, -1)):]:
            picked = per_pod.setdefault(pod, [])
            picked.append(gpu)
            if len(picked) == count:
                return pod, tuple(sorted(picked))
        return None

    def most_gpus_with(self, units: int) -> int:
        """The most GPUs of one pod that each have at least `units` free (for shortage messages)."""
        counts: dict[int, int] = {}
        for _, pod, _gpu in self.by_free[bisect_left(self.by_free, (units, -1, -1)):]:
            counts[pod] = counts.get(pod, 0) + 1
        return max(counts.values(), default=0)

    def whole_gpus(self, count: int) -> tuple[int, tuple[int, ...]] | None:
        """`count` whole free GPUs in the pod with the fewest whole free GPUs that suffices."""
        for bucket in self.buckets[count:]:
            if bucket:
                pod = bucket[0]
                gpus = tuple(i for i, f in enumerate(self.free[pod]) if f == FRACTION_UNITS)[:count]
                return pod, gpus
        return None

    def largest_whole_free(self) -> int:
        return max((c for c, bucket in enumerate(self.buckets) if bucket), default=0)

    def most_free_units(self) -> int:
        return self.by_free[-1][0] if self.by_free else 0


@dataclass(slots=True)
class CpuCapacity:
    """Free CPU RAM per (group index, pod), with a sorted index for best-fit lookups."""

    free: dict[tuple[int, int], int]
    by_free: list[tuple[int, int, int]]  # sorted (free bytes, group index, pod)

    @classmethod
    def empty(cls, groups: tuple[WorkerGroup, ...]) -> CpuCapacity:
        free = {(gi, p): g.cpu_memory_bytes for gi, g in enumerate(groups) for p in range(g.pods)}
        return cls(free=free, by_free=sorted((b, gi, p) for (gi, p), b in free.items()))

    def take(self, where: tuple[int, int], nbytes: int) -> bool:
        old = self.free.get(where)
        if old is None or old < nbytes:
            return False
        del self.by_free[bisect_left(self.by_free, (old, *where))]
        self.free[where] = old - nbytes
        insort(self.by_free, (old - nbytes, *where))
        return True

    def give(self, where: tuple[int, int], nbytes: int) -> None:
        old = self.free[where]
        del self.by_free[bisect_left(self.by_free, (old, *where))]
        self.free[where] = old + nbytes
        insort(self.by_free, (old + nbytes, *where))

    def tightest(self, nbytes: int) -> tuple[int, int] | None:
        idx = bisect_left(self.by_free, (nbytes, -1, -1))
        if idx == len(self.by_free):
            return None
        _, gi, pod = self.by_free[idx]
        return gi, pod

    def largest(self) -> int:
        return self.by_free[-1][0] if self.by_free else 0

"""Re-pack the replicas one plan placed: room for the ones left out, then fewer GPUs.

The placement pass (planner.py) is greedy: largest first, each replica where it fits tightest, an
empty GPU only when no used one has room. On mixed fleets that opens GPUs that other choices
would have avoided (a first model on the GPU whose rest cannot hold the next ones, a second
replica that must avoid its sibling's GPU landing on a fresh one) and leaves out replicas that
another packing holds. `repack` searches, depth first and branch-and-bound within a fixed amount
of work, for a packing of a given set of replicas into the room the kept placements leave: the
planner asks it first whether a left-out replica fits with the ones placed (any packing will do),
then for a packing of them all that uses fewer GPUs; it keeps its own packing unless one exists.

What the search may not change, so the planner's rules still hold: kept placements never move;
nothing is evicted; one model's replicas all take the same rank count (its kept replicas' count,
if any) and stay on distinct GPUs. The work budget, not a clock, bounds the search, so a plan is
the same on every machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ndif_operator.planning.sizing import Need
from ndif_operator.planning.types import FRACTION_UNITS, WorkerGroup

GpuId = tuple[int, int, int]  # (group index, pod, gpu)
PieceId = tuple[str, int]  # (request key, replica number)

# Searched only when a plan placed at most this many replicas; larger plans open many GPUs, where
# one GPU is a small fraction of the total and the greedy packing is already close to the bound.
MAX_PIECES = 48
# Work per search, in GPUs examined plus placements tried: at most a few hundred milliseconds, and
# far more than the small mixed fleets of bench/mixed_fleet.py need to reach their optimum.
STEPS = 50_000
# Searches for room for one more replica that the placement pass left out, per plan, and the work
# each may take (most of it is spent proving that there is no room).
ATTEMPTS = 4
ATTEMPT_STEPS = 10_000


@dataclass(frozen=True, slots=True)
class Piece:
    """One replica to place: the groups it may use with its need there, and GPUs it must avoid
    (those holding its model's kept replicas)."""

    key: str
    number: int
    options: tuple[tuple[int, Need], ...]
    avoid: frozenset[GpuId] = frozenset()


@dataclass(frozen=True, slots=True)
class Spot:
    """Where one piece goes: `gpus` of one pod of one group, `units` of each."""

    group: int
    pod: int
    gpus: tuple[int, ...]
    units: int


def _weight(piece: Piece, groups: Sequence[WorkerGroup]) -> int:
    """The least memory the piece takes, in units x bytes (exact integers, comparable across groups)."""
    return min(need.gpus * need.units * groups[gi].gpu_memory_bytes for gi, need in piece.options)


def lower_bound(groups: Sequence[WorkerGroup], free: Sequence[Sequence[Sequence[int]]],
                pieces: Sequence[Piece]) -> int:
    """GPUs in use that no packing of `pieces` into `free` can beat: those in use now, plus the
    fewest empty GPUs (largest first) whose memory covers what does not fit in the used ones' rest."""
    used, rest, empty = _census(groups, free)
    extra = _cover(groups, empty, sum(_weight(p, groups) for p in pieces) - rest)
    return used + (extra if extra is not None else 10**9)


def _census(groups: Sequence[WorkerGroup], free: Sequence[Sequence[Sequence[int]]]) -> tuple[int, int, list[int]]:
    """(GPUs in use, their free memory in units x bytes, empty GPUs per group)."""
    used = 0
    rest = 0
    empty = [0] * len(groups)
    for gi, group in enumerate(groups):
        for gpus in free[gi]:
            for units in gpus:
                if units == FRACTION_UNITS:
                    empty[gi] += 1
                else:
                    used += 1
                    rest += units * group.gpu_memory_bytes
    return used, rest, empty


def _cover(groups: Sequence[WorkerGroup], empty: Sequence[int], excess: int) -> int | None:
    """The fewest empty GPUs, largest first, that hold `excess` units x bytes; None if all cannot."""
    if excess <= 0:
        return 0
    count = 0
    for gi in sorted(range(len(groups)), key=lambda i: -groups[i].gpu_memory_bytes):
        size = FRACTION_UNITS * groups[gi].gpu_memory_bytes
        take = min(empty[gi], -(-excess // size))
        count += take
        excess -= take * size
        if excess <= 0:
            return count
    return None


class _Search:
    def __init__(self, groups: Sequence[WorkerGroup], free: Sequence[Sequence[Sequence[int]]],
                 pieces: Sequence[Piece], beat: int, steps: int, first: bool) -> None:
        self.groups = groups
        self.free = [[list(gpus) for gpus in pods] for pods in free]
        # Multi-GPU pieces first (they need several GPUs of one pod), then the largest.
        self.pieces = sorted(pieces, key=lambda p: (-max(n.gpus for _, n in p.options), -_weight(p, groups),
                                                    p.key, p.number))
        weights = [_weight(p, groups) for p in self.pieces]
        self.suffix = [sum(weights[i:]) for i in range(len(weights) + 1)]
        self.used, self.rest, self.empty = _census(groups, free)
        self.taken: dict[str, set[GpuId]] = {}
        for p in self.pieces:
            self.taken.setdefault(p.key, set()).update(p.avoid)
        self.best = beat
        self.best_spots: dict[PieceId, Spot] | None = None
        self.spots: dict[PieceId, Spot] = {}
        self.steps = steps
        self.first = first
        self.floor = self.used + (_cover(groups, self.empty, self.suffix[0] - self.rest) or 0)

    def run(self) -> dict[PieceId, Spot] | None:
        if self.floor < self.best:
            self._dfs(0, None)
        return self.best_spots

    def _bound(self, i: int) -> int | None:
        extra = _cover(self.groups, self.empty, self.suffix[i] - self.rest)
        return None if extra is None else self.used + extra

    def _dfs(self, i: int, previous: Spot | None) -> bool:
        """Place pieces i..; True once the search must stop (the floor is reached or steps ran out)."""
        bound = self._bound(i)
        if bound is None or bound >= self.best:
            return False
        if i == len(self.pieces):
            self.best, self.best_spots = self.used, dict(self.spots)
            return self.first or self.best <= self.floor
        piece = self.pieces[i]
        # Replicas of one model are interchangeable: place them in increasing GPU order only.
        after = previous if previous is not None and self.pieces[i - 1].key == piece.key else None
        for spot in self._candidates(piece, after):
            self.steps -= 1
            if self.steps < 0:
                return True  # out of budget: keep the best packing found so far
            self._take(piece, spot)
            stop = self._dfs(i + 1, spot)
            self._give(piece, spot)
            if stop:
                return True
        return False

    def _candidates(self, piece: Piece, after: Spot | None) -> list[Spot]:
        """Where the piece may go, most promising first: GPUs in use, the tightest fit (in bytes,
        across groups) first; then spots that open empty GPUs, fewest first, largest GPUs first.
        Empty GPUs are interchangeable, so one choice of them is offered per group for a one-GPU
        piece (multi-GPU pieces are placed first), and one empty pod per group for a multi-GPU one.
        `after`: the spot of the model's previous replica; this one takes as many GPUs, and a later
        first GPU (replicas of one model are interchangeable)."""
        taken = self.taken[piece.key]
        floor = (-1, -1, -1) if after is None else (after.group, after.pod, after.gpus[0])
        ranked: list[tuple[tuple[int, int, int], Spot]] = []
        for gi, need in piece.options:
            if after is not None and need.gpus != len(after.gpus):
                continue  # one model's replicas run the same tensor-parallel plan
            mem = self.groups[gi].gpu_memory_bytes
            opened = False
            for pod, gpus in enumerate(self.free[gi]):
                self.steps -= len(gpus)
                fits = [(units, gpu) for gpu, units in enumerate(gpus)
                        if units >= need.units and (gi, pod, gpu) not in taken]
                partial = sorted(f for f in fits if f[0] < FRACTION_UNITS)
                whole = [gpu for units, gpu in fits if units == FRACTION_UNITS]
                if need.gpus == 1:
                    ranked.extend(((0, (units - need.units) * mem, pod), Spot(gi, pod, (gpu,), need.units))
                                  for units, gpu in partial if (gi, pod, gpu) > floor)
                    first = next((gpu for gpu in whole if (gi, pod, gpu) > floor), None)
                    if first is not None and not opened:
                        opened = True
                        ranked.append(((1, -mem, pod), Spot(gi, pod, (first,), need.units)))
                    continue
                if not partial and len(whole) == len(gpus):
                    if opened:
                        continue  # another pod with nothing on it is already offered
                    opened = True
                for reuse in range(min(need.gpus, len(partial)), -1, -1):
                    fresh = need.gpus - reuse
                    if fresh > len(whole):
                        break
                    chosen = tuple(sorted([gpu for _, gpu in partial[:reuse]] + whole[:fresh]))
                    if (gi, pod, chosen[0]) <= floor:
                        continue
                    left = sum(units - need.units for units, _ in partial[:reuse])
                    ranked.append(((fresh, left * mem if fresh == 0 else -mem, pod), Spot(gi, pod, chosen, need.units)))
        ranked.sort(key=lambda item: (item[0], item[1].group, item[1].gpus))
        return [spot for _, spot in ranked]

    def _take(self, piece: Piece, spot: Spot) -> None:
        mem = self.groups[spot.group].gpu_memory_bytes
        taken = self.taken[piece.key]
        for gpu in spot.gpus:
            gid = (spot.group, spot.pod, gpu)
            units = self.free[spot.group][spot.pod][gpu]
            if units == FRACTION_UNITS:
                self.used += 1
                self.empty[spot.group] -= 1
                self.rest += FRACTION_UNITS * mem
            self.rest -= spot.units * mem
            self.free[spot.group][spot.pod][gpu] = units - spot.units
            taken.add(gid)
        self.spots[(piece.key, piece.number)] = spot

    def _give(self, piece: Piece, spot: Spot) -> None:
        mem = self.groups[spot.group].gpu_memory_bytes
        taken = self.taken[piece.key]
        for gpu in spot.gpus:
            units = self.free[spot.group][spot.pod][gpu] + spot.units
            self.free[spot.group][spot.pod][gpu] = units
            self.rest += spot.units * mem
            if units == FRACTION_UNITS:
                self.used -= 1
                self.empty[spot.group] += 1
                self.rest -= FRACTION_UNITS * mem
            taken.discard((spot.group, spot.pod, gpu))
        del self.spots[(piece.key, piece.number)]


def repack(groups: Sequence[WorkerGroup], free: Sequence[Sequence[Sequence[int]]], pieces: Sequence[Piece],
           *, beat: int | None = None, steps: int = STEPS, first: bool = False) -> dict[PieceId, Spot] | None:
    """A packing of `pieces` into the room `free` ([group][pod][gpu] free units) that uses fewer
    than `beat` GPUs in all (GPUs already in use count), or None if the search finds none within
    `steps` units of work (GPUs examined plus placements tried). `beat=None`: any packing that places
    every piece will do. The first packing found at the lower bound ends the search, and with
    `first` the first packing found at all."""
    if not pieces:
        return None
    if beat is None:
        beat = 1 + sum(g.pods * g.gpus_per_pod for g in groups)
    return _Search(groups, free, pieces, beat, steps, first).run()

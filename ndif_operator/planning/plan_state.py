"""The planner's working record of each request while one plan is built (shared by its phases)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ndif_operator.api import Level
from ndif_operator.planning.sizing import Need
from ndif_operator.planning.types import PlacementRequest

Order = tuple[int, int, int, int, str]


@dataclass(slots=True)
class Slot:
    group: int
    pod: int
    gpus: tuple[int, ...]
    units: int
    incumbent: bool  # carried over from the current placement (the only kind that may be evicted)


@dataclass(slots=True)
class RequestState:
    req: PlacementRequest
    order: Order
    group: int | None = None
    need: Need | None = None
    slots: dict[int, Slot] = field(default_factory=dict)
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


def warm_bytes(req: PlacementRequest) -> int:
    """CPU RAM a WARM copy holds: the weights (the runtime budget is only needed on a GPU)."""
    return req.weights_bytes if req.weights_bytes is not None else req.total_bytes or 0


def order(req: PlacementRequest) -> Order:
    was_hot = req.current is not None and req.current.level == Level.HOT
    return (0 if req.dedicated else 1, -req.priority, 0 if was_hot else 1, -(req.total_bytes or 0), req.key)

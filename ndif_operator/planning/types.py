"""The planner's input and output types: plain frozen dataclasses, no I/O.

The operator and the local mode build a `Inventory` and one `PlacementRequest` per
ModelDeployment, call `ndif_operator.planning.plan`, and render the returned `Plan`. Everything is
immutable and hashable so that a plan is a pure function of its input.

Vocabulary:
- a *worker group* is a set of identical pods (a KubeRay worker group); pods are numbered
  0..pods-1 and GPUs inside a pod 0..gpus_per_pod-1;
- a *replica slot* (`ReplicaPlacement`) is where one Serve replica lives: a pod, the GPUs it uses
  there (one per tensor-parallel rank, all distinct), and the fraction of each of those GPUs it
  may use (1.0 for whole GPUs; a TP rank may hold a fraction too, see sizing.py);
- a WARM model occupies CPU RAM of one pod (a slot with no GPUs); a COLD one occupies nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from ndif_operator.api import Level, Reason
from ndif_operator.api.parallel import ParallelShape

# Fractions of a GPU are multiples of 1/FRACTION_UNITS (Ray accepts 4 decimals for num_gpus).
FRACTION_UNITS = 10_000


@dataclass(frozen=True, slots=True)
class WorkerGroup:
    """A KubeRay worker group: `pods` identical pods."""

    name: str
    pods: int
    gpus_per_pod: int
    gpu_memory_bytes: int  # per GPU
    cpu_memory_bytes: int  # per pod, usable for WARM models (after the runtime's own needs)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("worker group name must not be empty")
        for attr in ("pods", "gpus_per_pod", "gpu_memory_bytes", "cpu_memory_bytes"):
            if getattr(self, attr) < 0:
                raise ValueError(f"worker group {self.name!r}: {attr} must be >= 0")
        if self.gpus_per_pod > 0 and self.gpu_memory_bytes <= 0:
            raise ValueError(f"worker group {self.name!r}: gpu_memory_bytes must be > 0 when it has GPUs")


@dataclass(frozen=True, slots=True)
class Inventory:
    """Every worker group the planner may use (heterogeneous across groups)."""

    groups: tuple[WorkerGroup, ...]

    def __post_init__(self) -> None:
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"worker group names must be unique, got {names}")

    @property
    def total_gpus(self) -> int:
        return sum(g.pods * g.gpus_per_pod for g in self.groups)

    def group(self, name: str) -> WorkerGroup | None:
        return next((g for g in self.groups if g.name == name), None)


@dataclass(frozen=True, slots=True)
class ReplicaPlacement:
    """Where one replica (HOT) or the model's CPU copy (WARM) lives."""

    pod: int  # index within the worker group
    gpus: tuple[int, ...] = ()  # GPU indices in the pod; empty for WARM
    fraction: float = 1.0  # share of each listed GPU (1.0 = whole GPUs, < 1 = shared GPU)
    # The worker group of this replica when it is not the decision's `worker_group` (a replica
    # added where there was free room rather than evicting a neighbour); None = the decision's.
    group: str | None = None

    def where(self, default_group: str | None) -> str:
        """'h100 pod 0 GPU 3' / 'h100 pod 1 GPUs 0,1' / 'h100 pod 2' (a Warm copy)."""
        gpus = f" GPU{'s' if len(self.gpus) > 1 else ''} {','.join(map(str, self.gpus))}" if self.gpus else ""
        return f"{self.group or default_group} pod {self.pod}{gpus}"


@dataclass(frozen=True, slots=True)
class CurrentPlacement:
    """What a deployment holds now (from its status), so that the planner keeps it stable."""

    level: Level
    worker_group: str | None = None
    replicas: tuple[ReplicaPlacement, ...] = ()
    since: datetime | None = None  # when it reached this level; drives minimum deployment time


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    """One ModelDeployment as the planner sees it."""

    key: str  # "namespace/name"
    total_bytes: int | None  # weights + runtime budget per replica; None = not sized yet
    weights_bytes: int | None  # what a WARM copy needs in CPU RAM; None = not sized yet
    level: Level = Level.HOT  # desired level
    replicas: int = 1
    tensor_parallel_size: int | Literal["auto"] = 1
    # The largest TP size the model itself supports (e.g. what its attention heads divide into);
    # None = no limit beyond the allowed sizes. "auto" never goes above it.
    max_tensor_parallel_size: int | None = None
    # Heads / kv heads / intermediate size / model type: `ndif_operator.api.parallel` decides from
    # them which sizes are possible at all. None = unknown (only the allowed sizes apply).
    parallel: ParallelShape | None = None
    priority: int = 0
    dedicated: bool = False
    minimum_deployment_seconds: int = 0
    current: CurrentPlacement | None = None
    # ((k, bytes one rank needs at tensor-parallel size k), ...) from the estimate: what is
    # replicated on every rank is not divided. Empty = divide total_bytes evenly (`sizing.rank_bytes`).
    rank_bytes: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if not self.key:
            raise ValueError("placement request key must not be empty")
        if self.replicas < 0:
            raise ValueError(f"{self.key}: replicas must be >= 0")
        if self.tensor_parallel_size != "auto" and self.tensor_parallel_size not in (1, 2, 4, 8):
            raise ValueError(f"{self.key}: tensor_parallel_size must be 1, 2, 4, 8 or 'auto'")
        if self.max_tensor_parallel_size is not None and self.max_tensor_parallel_size < 1:
            raise ValueError(f"{self.key}: max_tensor_parallel_size must be >= 1")
        for attr in ("total_bytes", "weights_bytes"):
            value = getattr(self, attr)
            if value is not None and value < 0:
                raise ValueError(f"{self.key}: {attr} must be >= 0")


@dataclass(frozen=True, slots=True)
class Decision:
    """The planner's answer for one deployment."""

    key: str
    level: Level  # granted level
    replicas: int  # granted HOT replicas (0 unless HOT)
    # The sum of a replica's GPU shares: k (whole-GPU TP), k x gpu_fraction (fractional TP), or the
    # fraction of one GPU; 0 unless HOT. Not the TP size: use `tensor_parallel_size`.
    gpus_per_replica: float
    gpu_fraction: float  # share of EACH of a replica's GPUs (one per TP rank): 1.0 for whole GPUs
    worker_group: str | None  # where the replicas (HOT) or the CPU copy (WARM) live
    assignments: tuple[ReplicaPlacement, ...]  # one per HOT replica, or one for the WARM copy
    reason: Reason
    message: str  # human-actionable, e.g. "needs 2x80 GiB GPUs in one pod; largest free is 1"
    since: datetime | None = None  # kept from the current placement when nothing changed
    moved: bool = False  # True when this decision changes an existing placement

    @property
    def tensor_parallel_size(self) -> int:
        """Ranks per replica: the number of GPUs in a replica's assignment (0 unless HOT)."""
        if self.level != Level.HOT:
            return 0
        if self.assignments and self.assignments[0].gpus:
            return len(self.assignments[0].gpus)
        # Hand-built decisions without assignments (renderer tests): whole GPUs were the only TP.
        return max(1, int(self.gpus_per_replica))


@dataclass(frozen=True, slots=True)
class Plan:
    """A whole plan: one decision per request, sorted by key, and summary numbers."""

    decisions: tuple[Decision, ...]
    gpus_total: int = 0
    gpus_used: int = 0  # GPUs with at least one replica on them
    gpu_memory_reserved_bytes: int = 0  # sum of HOT replicas' budgets
    moves: int = 0  # decisions with moved=True
    by_key: dict[str, Decision] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if not self.by_key:
            object.__setattr__(self, "by_key", {d.key: d for d in self.decisions})

    def decision(self, key: str) -> Decision:
        return self.by_key[key]

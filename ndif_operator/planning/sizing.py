"""How many GPUs, and what share of each, one replica needs in a given worker group."""

from __future__ import annotations

from dataclasses import dataclass

from ndif_operator.planning.types import FRACTION_UNITS, PlacementRequest, WorkerGroup


def human_bytes(n: float) -> str:
    """1024-based, short: '80 GiB', '1.5 GiB', '512 MiB'."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value >= 100 or value == int(value) else f"{value:.1f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True, slots=True)
class Need:
    """`gpus` GPUs per replica, `units` of each (FRACTION_UNITS = the whole GPU)."""

    gpus: int
    units: int

    @property
    def shared(self) -> bool:
        return self.gpus == 1 and self.units < FRACTION_UNITS

    @property
    def fraction(self) -> float:
        return self.units / FRACTION_UNITS


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def need_in(request: PlacementRequest, group: WorkerGroup) -> Need | str:
    """The need of one replica of `request` in `group`, or why it can never fit there."""
    total = request.total_bytes or 0
    mem, per_pod = group.gpu_memory_bytes, group.gpus_per_pod
    if per_pod == 0:
        return f"worker group {group.name} has no GPUs"
    tp = request.tensor_parallel_size
    # "auto" means the fewest whole GPUs that hold the model (the runtime splits layers across
    # them), not only the powers of two an explicit tensorParallelSize allows.
    count = max(1, _ceil_div(total, mem)) if tp == "auto" else tp
    if count > per_pod:
        return (
            f"needs {count}x{human_bytes(mem)} GPUs in one pod; pods of {group.name} have {per_pod}"
        )
    if count == 1:
        # Round the share up so that shares on one GPU never add up to more memory than it has.
        units = max(1, _ceil_div(total * FRACTION_UNITS, mem))
        if units > FRACTION_UNITS:
            return (
                f"needs {human_bytes(total)} on one GPU; {group.name} GPUs have {human_bytes(mem)}"
                " (set tensorParallelSize: auto)"
            )
        return Need(1, units)
    per_gpu = _ceil_div(total, count)
    if per_gpu > mem:
        return (
            f"needs {human_bytes(per_gpu)} per GPU at tensorParallelSize {count};"
            f" {group.name} GPUs have {human_bytes(mem)}"
        )
    return Need(count, FRACTION_UNITS)

"""How many GPUs, and what share of each, one replica needs in a given worker group.

A replica that fits one GPU takes a memory-proportional share of it. A larger one is split over
k tensor-parallel ranks, k the smallest allowed size (1, 2, 4, 8: what the CRD accepts and what
attention heads divide into) whose per-rank memory fits one GPU. By default each rank then takes
only its share f of a GPU (rounded up to FRACTION_UNITS), and the rest of that GPU stays free for
small models; with `whole_gpu_tensor_parallel` ranks hold whole GPUs (isolation over density).

Because k is minimal, f > 1/2 (with k/2 ranks a rank would not fit), so two ranks of one replica
can never share a GPU: that is what makes Ray's per-bundle GPU assignment of
`placement_group_bundles: [{GPU: f}] * k` (STRICT_PACK) safe. An explicit tensorParallelSize
larger than needed could give f <= 1/2; the share is then raised to just over 1/2 to keep that
guarantee (memory is never under-reserved, only over-reserved).
"""

from __future__ import annotations

from dataclasses import dataclass

from ndif_operator.api.parallel import describe_problems, tensor_parallel_problems
from ndif_operator.api.units import human_bytes
from ndif_operator.evaluation.budget import CUDA_CONTEXT_BYTES
from ndif_operator.planning.types import FRACTION_UNITS, PlacementRequest, WorkerGroup

TP_SIZES = (1, 2, 4, 8)
# Every rank is its own process with its own CUDA context; the estimate counts one per replica.
RANK_CONTEXT_BYTES = CUDA_CONTEXT_BYTES
# The smallest share a rank of a multi-GPU replica may take: more than half a GPU (see above).
MIN_RANK_UNITS = FRACTION_UNITS // 2 + 1


@dataclass(frozen=True, slots=True)
class Need:
    """`gpus` GPUs per replica (its TP ranks), `units` of each (FRACTION_UNITS = the whole GPU)."""

    gpus: int
    units: int

    @property
    def shared(self) -> bool:
        """One GPU, shared with others (the single-GPU fractional case)."""
        return self.gpus == 1 and self.units < FRACTION_UNITS

    @property
    def whole(self) -> bool:
        return self.units == FRACTION_UNITS

    @property
    def fraction(self) -> float:
        return self.units / FRACTION_UNITS

    @property
    def total_units(self) -> int:
        return self.gpus * self.units

    def describe(self) -> str:
        """'0.25 GPU', '2 GPUs', '2x0.5938 GPU' (k ranks, each a share of its own GPU)."""
        if self.gpus == 1:
            return "1 GPU" if self.whole else f"{self.fraction:g} GPU"
        return f"{self.gpus} GPUs" if self.whole else f"{self.gpus}x{self.fraction:g} GPU"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def rank_bytes(request: PlacementRequest, ranks: int) -> int:
    """GPU memory one of `ranks` tensor-parallel ranks of `request` needs.

    The estimate's per-rank figure when it has one (what every rank replicates is not divided);
    otherwise an even split of the total plus each rank's own CUDA context.
    """
    for k, need in request.rank_bytes:
        if k == ranks:
            return need
    total = request.total_bytes or 0
    return _ceil_div(total + (ranks - 1) * RANK_CONTEXT_BYTES, ranks)


def _tp_limit(request: PlacementRequest) -> int:
    return request.max_tensor_parallel_size if request.max_tensor_parallel_size is not None else TP_SIZES[-1]


def impossible_tensor_parallel_size(request: PlacementRequest) -> bool:
    """An explicit size the model cannot be split into (heads, kv heads, MLP width, no plan)."""
    tp, shape = request.tensor_parallel_size, request.parallel
    return tp != "auto" and shape is not None and bool(tensor_parallel_problems(shape, tp))


def check_tp_sizes(sizes: tuple[int, ...]) -> None:
    if not sizes or sizes[0] != 1 or list(sizes) != sorted(set(sizes)):
        raise ValueError(f"tensor-parallel sizes must be increasing, distinct and start at 1, got {sizes}")


def need_in(
    request: PlacementRequest,
    group: WorkerGroup,
    *,
    whole_gpu_tensor_parallel: bool = False,
    auto_sizes: tuple[int, ...] = TP_SIZES,
) -> Need | str:
    """The need of one replica of `request` in `group`, or why it can never fit there.

    `auto_sizes` are the TP sizes "auto" may pick (the runtime's); explicit sizes are the CRD's.
    """
    total = request.total_bytes or 0
    mem, per_pod = group.gpu_memory_bytes, group.gpus_per_pod
    if per_pod == 0:
        return f"worker group {group.name} has no GPUs"
    tp, limit = request.tensor_parallel_size, _tp_limit(request)
    shape = request.parallel
    if tp == "auto":
        allowed = [k for k in auto_sizes if k <= limit and (shape is None or not tensor_parallel_problems(shape, k))]
        fitting = [k for k in allowed if rank_bytes(request, k) <= mem]
        if not fitting:
            return (
                f"needs {human_bytes(rank_bytes(request, allowed[-1]))} per GPU at tensorParallelSize"
                f" {allowed[-1]} (the largest it allows); {group.name} GPUs have {human_bytes(mem)}"
            )
        count = fitting[0]
    else:
        if tp > limit:
            return f"tensorParallelSize {tp} is above the model's limit of {limit}"
        if shape is not None and tensor_parallel_problems(shape, tp):
            return describe_problems(shape, tp)
        count = tp
    if count > per_pod:
        return f"needs {count}x{human_bytes(mem)} GPUs in one pod; pods of {group.name} have {per_pod}"
    per_gpu = rank_bytes(request, count)
    if per_gpu > mem:
        if count == 1:
            return (
                f"needs {human_bytes(total)} on one GPU; {group.name} GPUs have {human_bytes(mem)}"
                " (set tensorParallelSize: auto)"
            )
        return (
            f"needs {human_bytes(per_gpu)} per GPU at tensorParallelSize {count};"
            f" {group.name} GPUs have {human_bytes(mem)}"
        )
    # Round the share up so that shares on one GPU never add up to more memory than it has.
    units = max(1, _ceil_div(per_gpu * FRACTION_UNITS, mem))
    if count > 1:
        units = FRACTION_UNITS if whole_gpu_tensor_parallel else max(units, MIN_RANK_UNITS)
    return Need(count, units)

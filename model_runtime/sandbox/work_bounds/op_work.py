"""The work an op call is about to do, from its arguments (the Python fallback guard's view).

`cost_of` turns a priced op's arguments (`OpArguments`: by schema name, defaults filled in) into
floating-point operations, elements read or n log n steps, by the kind of price `priced_ops`
gives it: the formulas of `work_bounds::cost_of` (`native/work_bounds.h`), which the native
kernels apply to the same arguments. 0 means the work is unknown: the op runs unpriced.
"""

from __future__ import annotations

import math
from typing import Any

from model_runtime.sandbox.work_bounds.priced_ops import Cost

STEP_FLOPS = 1e5  # a recurrent step's fixed cost in float-op equivalents (`kStepFlops`)


class OpArguments:
    """An op call's arguments by schema name, defaults filled in (as the native kernels see them)."""

    __slots__ = ("args", "kwargs", "names", "schema")

    def __init__(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        global _TENSOR
        if _TENSOR is None:  # looked up on the first priced op: importing this module imports no torch
            import torch

            _TENSOR = torch.Tensor
        self.schema = func._schema
        self.args = args
        self.kwargs = kwargs
        names = _NAMES.get(func)
        if names is None:
            names = _NAMES[func] = {a.name: (i, a.default_value) for i, a in enumerate(self.schema.arguments)}
        self.names = names

    def get(self, name: str) -> Any:
        entry = self.names.get(name)
        if entry is None:
            return None
        i, default = entry
        return self.args[i] if i < len(self.args) else self.kwargs.get(name, default)

    def tensor(self, *names: str) -> Any:
        for name in names:
            value = self.get(name)
            if isinstance(value, _TENSOR):
                return value
        return None

    def ints(self, name: str) -> list[int]:
        value = self.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return [value]
        return [int(v) for v in value] if isinstance(value, (list, tuple)) else []

    def values(self) -> list[Any]:
        return [self.get(a.name) for a in self.schema.arguments]

    def placement(self) -> tuple[bool, Any]:
        """The first tensor argument's (is on the CPU, dtype): what the kernel is chosen by."""
        import torch

        for value in (*self.args, *self.kwargs.values()):
            if isinstance(value, torch.Tensor):
                return value.device.type == "cpu", value.dtype
        return True, torch.float32


_NAMES: dict[Any, dict[str, tuple[int, Any]]] = {}  # per op: argument name -> (position, default)
_TENSOR: Any = None  # torch.Tensor, once the Python guard prices its first op


def _at_or(values: list[int], i: int, fallback: int) -> int:
    return values[min(i, len(values) - 1)] if values else fallback


def _window_out(size: int, kernel: int, stride: int, padding: int, dilation: int) -> float:
    span = dilation * (kernel - 1) + 1
    room = size + 2 * padding - span
    return 0.0 if room < 0 else math.floor(room / max(stride, 1)) + 1


def cost_of(kind: int, a: OpArguments) -> float:
    """Floating-point operations (compare steps for NLOGN, elements for CHAIN) the op is about to
    do; 0 when unknown. The formulas of `work_bounds::cost_of`."""
    if kind == Cost.MATMUL:
        left, right = a.tensor("mat1", "batch1", "self"), a.tensor("mat2", "batch2", "other")
        return 0.0 if left is None or right is None or right.dim() < 1 else 2.0 * left.numel() * right.size(-1)
    if kind in (Cost.CONV, Cost.NARROW_CONV):
        return _conv_cost(a, narrow=kind == Cost.NARROW_CONV)
    if kind == Cost.ATTENTION:
        q, k, v = a.tensor("query", "q"), a.tensor("key", "k"), a.tensor("value", "v")
        if q is None or k is None or v is None or q.dim() < 2 or k.dim() < 2 or v.dim() < 1:
            return 0.0
        rows = q.numel() / max(q.size(-1), 1)
        keys = max(k.size(-2), k.size(-3) if k.dim() >= 3 else 1)
        return float(2.0 * rows * keys * (q.size(-1) + v.size(-1)))
    if kind == Cost.CUBIC:
        m = a.tensor("self", "A", "input", "LU", "B")
        return 0.0 if m is None or m.dim() < 2 else float(m.numel()) * min(m.size(-1), m.size(-2))
    if kind == Cost.POOL:
        return _pool_cost(a)
    if kind == Cost.PAIRWISE:
        x1, x2 = a.tensor("x1"), a.tensor("x2")
        return 0.0 if x1 is None or x2 is None or x2.dim() < 2 else 2.0 * x1.numel() * x2.size(-2)
    if kind == Cost.CHAIN:
        tensors = a.get("tensors")
        return float(len(tensors)) ** 3 if isinstance(tensors, (list, tuple)) else 0.0
    if kind == Cost.RECURRENT:
        return _recurrent_cost(a)
    if kind == Cost.NLOGN:
        return _nlogn_cost(a)
    if kind == Cost.LINEAR:
        x, w = a.tensor("input", "self", "inp"), a.tensor("weight", "coefficients", "mat2", "packed_weights")
        if x is None or w is None:
            return 0.0
        rows = a.get("out_features")
        if not isinstance(rows, int) or isinstance(rows, bool):
            rows = w.size(0) if w.dim() >= 2 else 1
        return float(2.0 * x.numel() * rows)
    if kind == Cost.TRILINEAR:
        return _trilinear_cost(a)
    if kind == Cost.ENCODER:
        return _encoder_cost(a)
    if kind == Cost.BAG:
        w, indices = a.tensor("weight"), a.tensor("indices")
        return 0.0 if w is None or indices is None or w.dim() < 1 else float(indices.numel() * w.size(-1))
    if kind == Cost.OUTPUTS:
        return _outputs_cost(a)
    if kind in (Cost.ROW_PAIRS, Cost.LABEL_PAIRS):
        x = a.tensor("self")
        if x is None or x.dim() < 1:
            return 0.0
        if kind == Cost.LABEL_PAIRS:
            return float(x.numel() * x.size(-1))
        return 0.0 if x.dim() < 2 else float(x.numel() * x.size(-2) / 2)
    return 0.0


def _outputs_cost(a: OpArguments) -> float:
    """The tensors a splitting op makes: one per index along `dim` (`unbind`), per `split_size`
    run of it, per chunk (at most one per index), per section, or one per item of a list of
    sizes (of indices, plus one: the piece after the last)."""
    t = a.tensor("self")
    if t is None or t.dim() < 1:
        return 0.0
    dim = a.get("dim")
    d = dim if _is_int(dim) else 0
    d = d + t.dim() if d < 0 else d
    length = t.size(d) if 0 <= d < t.dim() else 1
    split_size, chunks, sections, indices = (a.get(n) for n in ("split_size", "chunks", "sections", "indices"))
    if _is_int(split_size):
        return float(max(-(-length // max(split_size, 1)), 1))
    if _is_int(chunks):
        return float(min(chunks, max(length, 1)))
    if _is_int(sections):
        return float(sections)
    if isinstance(split_size, (list, tuple)):
        return float(len(split_size))
    if isinstance(indices, (list, tuple)):
        return float(len(indices) + 1)
    if "tensor_indices_or_sections" in a.names:
        return 0.0  # decomposes into `tensor_split` by sections or by indices, priced there
    return float(length)  # unbind


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _trilinear_cost(a: OpArguments) -> float:
    """2 x the size of the index space i1, i2 and i3 span once each is unsqueezed at its
    `expand` dims (each product and sum of the kernel runs over it)."""
    operands = (a.tensor("i1"), a.tensor("i2"), a.tensor("i3"))
    space: list[int] = []
    for t, expand in zip(operands, (a.ints("expand1"), a.ints("expand2"), a.ints("expand3")), strict=True):
        if t is None:
            return 0.0
        sizes = list(t.shape)
        for d in sorted(expand):
            if 0 <= d <= len(sizes):
                sizes.insert(d, 1)
        if len(space) < len(sizes):
            space.extend([1] * (len(sizes) - len(space)))
        space = [max(s, n) for s, n in zip(space, sizes + [1] * (len(space) - len(sizes)), strict=True)]
    return 2.0 * math.prod(space)


def _encoder_cost(a: OpArguments) -> float:
    """A fused encoder layer (`TransformerEncoderLayer`'s inference fast path): every row
    multiplies by the projections' and the feed-forward's weights, and attends to its sequence."""
    src = a.tensor("src")
    if src is None or src.dim() < 2 or src.is_nested:
        return 0.0
    width = max(src.size(-1), 1)
    rows = src.numel() / width
    weights = sum(float(a.get(name).numel()) for name in _ENCODER_WEIGHTS if isinstance(a.get(name), _TENSOR))
    return float(2.0 * rows * weights + 4.0 * rows * src.size(-2) * width)


_ENCODER_WEIGHTS = ("qkv_weight", "proj_weight", "ffn_weight_1", "ffn_weight_2")


def _conv_cost(a: OpArguments, narrow: bool = False) -> float:
    x, weight = a.tensor("input", "self"), a.tensor("weight")
    if x is None or weight is None or weight.dim() < 3 or x.dim() < weight.dim() - 1:
        return 0.0
    spatial = weight.dim() - 2
    transposed = a.get("transposed") is True or "transpose" in a.schema.name
    sizes = list(x.shape)
    if a.schema.name == "aten::conv_tbc":  # input (time, batch, in), weight (width, in, out)
        if x.dim() != 3:
            return 0.0
        pad = a.ints("pad")
        return float(2.0 * _window_out(sizes[0], weight.size(0), 1, _at_or(pad, 0, 0), 1) * sizes[1] * weight.numel())
    first = len(sizes) - spatial
    batch = math.prod(sizes[:first]) / max(sizes[first - 1], 1)
    if transposed:
        positions = float(math.prod(sizes[first:]))
    else:
        stride, padding, dilation = a.ints("stride"), a.ints("padding"), a.ints("dilation")
        positions = 1.0
        for i in range(spatial):
            positions *= _window_out(sizes[first + i], weight.size(2 + i), _at_or(stride, i, 1),
                                     _at_or(padding, i, 0), _at_or(dilation, i, 1))
    flops = float(2.0 * batch * positions * weight.numel())
    # a narrow convolution's unfolded input per group and sample (positions x window x channels)
    if narrow and positions * weight.numel() / max(weight.size(0), 1) > NARROW_LARGE_ELEMENTS:
        return flops * NARROW_LARGE_SLOWDOWN
    return flops


# A convolution whose in x out channels per group are fewer than this runs far below a product's
# rate on one x86 core: single-channel 1.7-12 GFLOP/s, depthwise 18-127, 64 in to 1 out 7.9, 8 x 8
# channels 42, against 108 for 16 x 16 per group and 149 dense (a 192 x 192 product: ~90).
NARROW_CHANNELS = 256
# ... and slower still once its unfolded input per group (output positions x window x channels)
# outgrows the caches: a single-channel 3 x 3 convolution runs 9-14 GFLOP/s up to 256 x 256, 3.7-4.7
# at 512 x 512 (2.3 M unfolded elements), 0.54 from 1024 x 1024 (9.4 M). Its float ops count this
# much more above this size.
NARROW_LARGE_ELEMENTS = 2**22
NARROW_LARGE_SLOWDOWN = 8.0


def priced_kind(kind: int, a: OpArguments) -> int:
    """The price an op of the table's `kind` is charged: a convolution with a narrow channel block
    (in x out channels per group below `NARROW_CHANNELS`) is NARROW_CONV (`work_bounds::priced_kind`)."""
    if kind != Cost.CONV:
        return kind
    weight = a.tensor("weight")
    if weight is None or weight.dim() < 3:
        return kind
    name = a.schema.name
    if "depthwise" in name:
        block = 1
    elif name == "aten::conv_tbc":  # weight (width, in, out)
        block = weight.size(1) * weight.size(2)
    else:  # (out, in / groups, ...), or (in, out / groups, ...) when transposed: the same product
        groups = a.get("groups")
        block = weight.size(0) * weight.size(1) // max(groups if _is_int(groups) else 1, 1)
    return int(Cost.NARROW_CONV) if block < NARROW_CHANNELS else kind


def _pool_cost(a: OpArguments) -> float:
    x, kernel = a.tensor("self", "input"), a.ints("kernel_size")
    if x is None or not kernel:
        return 0.0
    spatial = min(len(kernel), x.dim())
    sizes = list(x.shape)
    first = len(sizes) - spatial
    stride, padding, dilation = a.ints("stride"), a.ints("padding"), a.ints("dilation")
    output_size = a.ints("output_size")  # fractional pooling: given
    positions = float(math.prod(sizes[:first]))
    for i in range(spatial):
        k = _at_or(kernel, i, 1)
        if output_size:
            positions *= _at_or(output_size, i, 1) * k
            continue
        positions *= _window_out(sizes[first + i], k, _at_or(stride, i, k), _at_or(padding, i, 0),
                                 _at_or(dilation, i, 1)) * k
    return positions


def _recurrent_cost(a: OpArguments) -> float:
    import torch

    x = a.tensor("input", "data")
    if x is None or x.dim() < 1:
        return 0.0
    weights = 0.0
    for argument, value in zip(a.schema.arguments, a.values(), strict=True):
        if isinstance(value, (list, tuple)):
            weights += sum(t.numel() for t in value if isinstance(t, torch.Tensor))
        elif isinstance(value, torch.Tensor) and argument.name.startswith("weight"):
            weights += value.numel()
    rows = x.numel() / max(x.size(-1), 1)
    return float(rows * (2.0 * weights + STEP_FLOPS))


# Sorting 8-byte elements (int64, float64, complex64) over more than this runs below the rate
# measured in cache: along an outer dimension ~80-100 M steps/s up to 2**20 elements (8 MiB) and
# 38-45 M from 2**22 (32 MiB) on one x86 core (4-byte ones keep ~90 M; along the last dimension
# int64 sorts run 400+ M); the steps of an n log n op over such larger tensors count this much more.
LARGE_SORT_BYTES = 2**23
LARGE_SORT_SLOWDOWN = 2.5


def _nlogn_cost(a: OpArguments) -> float:
    t = a.tensor("self", "input")
    if t is None or t.numel() < 2:
        return 0.0
    numel = float(t.numel())
    rank = t.dim()

    def length(d: int) -> float:
        d = d + rank if d < 0 else d
        return float(t.size(d)) if 0 <= d < rank else numel

    n = numel
    dim = a.get("dim")
    if isinstance(dim, int) and not isinstance(dim, bool):
        n = length(dim)
    elif isinstance(dim, (list, tuple)) and dim:
        n = min(math.prod(length(int(d)) for d in dim), numel)
    steps = numel * math.log2(max(n, 2.0))
    large = t.element_size() >= 8 and numel * t.element_size() > LARGE_SORT_BYTES
    return steps * LARGE_SORT_SLOWDOWN if large else steps

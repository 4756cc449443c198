"""Every torch op with write semantics, from the op registry, and a way to call each one.

`write_ops()` lists the registered operator overloads whose schema marks an argument as
written (`alias_info.is_write`), plus the batch-norm ops that update running statistics without
their schema saying so. `build_call(op, target)` builds positional and keyword
arguments for `op` from its schema alone, with `target` (a server tensor) in every written
position and small ordinary values elsewhere; it is deliberately generic, so some calls are
refused by the op's own argument checks before anything is written (that is recorded as the
reason the op could not be reached with a server tensor, per op).
"""

from __future__ import annotations

from typing import Any

import torch

from model_runtime.sandbox.dispatch_guard import op_rule


def registry_ops() -> list[Any]:
    """Every operator overload in torch's registry that Python can call."""
    ops = []
    for full in sorted(torch._C._dispatch_get_all_op_names()):
        namespace, _, rest = full.partition("::")
        name, _, overload = rest.partition(".")
        try:
            ops.append(getattr(getattr(getattr(torch.ops, namespace), name), overload or "default"))
        except (AttributeError, RuntimeError):
            continue  # registered schema without a Python binding (e.g. a not-loaded library)
    return ops


def write_ops() -> list[Any]:
    return [op for op in registry_ops() if op_rule(op).written or op_rule(op).stats]


# running-stat and dropout paths write only when on
_TRAINING_FLAGS = frozenset({"train", "training", "use_input_stats"})


def _value(arg: Any, target: torch.Tensor, written: bool) -> Any:
    kind = str(arg.type)
    if written:
        return [target] if kind.startswith("List[") else target
    if arg.has_default_value():
        return arg.default_value
    base = kind[len("Optional[") : -1] if kind.startswith("Optional[") else kind
    simple: dict[str, Any] = {
        "Tensor": torch.ones_like(target),
        "List[Tensor]": [torch.ones_like(target)],
        "List[Optional[Tensor]]": [torch.ones_like(target)],
        "List[int]": list(target.shape),
        "List[SymInt]": list(target.shape),
        "List[float]": [1.0],
        "List[number]": [1.0],
        "List[bool]": [True, True, True],
        "int": 1,
        "SymInt": 1,
        "float": 1.0,
        "bool": arg.name in _TRAINING_FLAGS,
        "number": 1,
        "Scalar": 1,
        "ScalarType": target.dtype,
        "str": "none",
        "Device": target.device,
    }
    if base in simple:
        return simple[base]
    if base == "Storage":
        return torch.ones_like(target).untyped_storage()
    return None


def build_call(op: Any, target: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    rule = op_rule(op)
    written = {position for position, _name in rule.written + rule.stats}
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for position, arg in enumerate(op._schema.arguments):
        value = _value(arg, target, position in written)
        if arg.kwarg_only:
            kwargs[arg.name] = value
        else:
            args.append(value)
    return tuple(args), kwargs

"""Kubernetes resource quantities ("80Gi", "500M", "1.5", "2e3") as numbers."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_SUFFIXES: dict[str, Decimal | int] = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}
_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")


def parse_quantity(value: str | int | float) -> Decimal:
    """The value of a quantity; raises ValueError on anything Kubernetes would reject."""
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, int | float):
        return Decimal(str(value))
    match = _QUANTITY.match(value.strip())
    if match is None:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    number, suffix = match.groups()
    try:
        return Decimal(number) * Decimal(_SUFFIXES[suffix or ""])
    except InvalidOperation as exc:
        raise ValueError(f"not a Kubernetes quantity: {value!r}") from exc


def quantity_bytes(value: str | int | float) -> int:
    return int(parse_quantity(value))


_MEMORY_SUFFIXES = ("Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "k", "M", "G", "T", "P", "E")


def memory_bytes(value: object, what: str) -> int:
    """A memory quantity that must carry its unit ("80Gi", "500M"): a bare number is refused.

    `gpuMemory: 80` would otherwise be 80 bytes; Kubernetes reads it that way, no admin means it.
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{what}: expected a quantity with a unit such as 80Gi, got {value!r}")
    text = str(value).strip()
    match = _QUANTITY.match(text)
    if match is None:
        raise ValueError(f"{what}: {value!r} is not a Kubernetes quantity (e.g. 80Gi, 141G)")
    if match.group(2) not in _MEMORY_SUFFIXES:
        raise ValueError(f"{what}: {value!r} has no memory unit; write e.g. {match.group(1)}Gi (GiB) or "
                         f"{match.group(1)}G (GB)")
    amount = parse_quantity(text)
    if amount < 0 or amount != amount.to_integral_value():
        raise ValueError(f"{what}: {value!r} is not a whole number of bytes >= 0")
    return int(amount)


def whole_count(value: object, what: str) -> int:
    """A count (pods, GPUs per pod): a whole number >= 0; `2.7` is refused, never truncated."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a whole number, got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    else:
        raise ValueError(f"{what}: expected a whole number, got {value!r}")
    if number < 0:
        raise ValueError(f"{what}: must be >= 0, got {number}")
    return number

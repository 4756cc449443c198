"""Byte counts as people read them, one format everywhere (status, plan messages, tables)."""

from __future__ import annotations

_UNITS = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


def human_bytes(n: float) -> str:
    """1024-based, short: '80 GiB', '1.5 GiB', '194 GiB', '512 MiB'."""
    for unit, size in _UNITS:
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value >= 100 or value == int(value) else f"{value:.1f} {unit}"
    return f"{int(n)} B"

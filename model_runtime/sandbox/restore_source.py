"""The pristine bytes server tensors were filled from: weight integrity restores from them without a
copy of its own (sandbox/integrity.py's module doc says when a source vouches for a tensor)."""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch


class RestoreSource:
    """The pristine bytes server tensors were filled from (see the module doc): per registered
    tensor, a flat uint8 host array of its storage's size. It holds the tensors weakly (it never
    keeps weights alive) and the arrays strongly (they keep the pages they view mapped)."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref[torch.Tensor], int, np.ndarray[Any, Any]]] = {}

    def add(self, tensor: torch.Tensor, pristine: np.ndarray[Any, Any]) -> None:
        """Record that `tensor`'s storage was filled from `pristine` (call right after filling it)."""
        if pristine.dtype != np.uint8 or pristine.ndim != 1 or not pristine.flags.c_contiguous:
            raise ValueError("a restore source is a flat, contiguous uint8 array")
        self._entries[id(tensor)] = (weakref.ref(tensor), int(tensor.untyped_storage().data_ptr()), pristine)

    def pristine(self, tensor: torch.Tensor) -> np.ndarray[Any, Any] | None:
        """The bytes `tensor`'s whole storage was filled from, while it is the registered object,
        on the storage it had then, of the array's size; else None."""
        entry = self._entries.get(id(tensor))
        if entry is None:
            return None
        ref, ptr, array = entry
        storage = tensor.untyped_storage()
        if ref() is not tensor or int(storage.data_ptr()) != ptr or int(storage.nbytes()) != array.nbytes:
            return None
        return array

    def __len__(self) -> int:
        return len(self._entries)


def host_view(array: np.ndarray[Any, Any]) -> torch.Tensor:
    """A uint8 tensor over `array`'s bytes, no copy (it holds the array; read-only pages are only
    ever read: they are what the weights are restored from). Call with torch's warning about
    read-only buffers silenced."""
    return torch.frombuffer(array, dtype=torch.uint8)


"""`torch.save` bytes in torch's non-zip format, written without torch's per-object Python hooks.

    data = saved_bytes({"logits": tensor, "n": 3})   # what torch.save(..., non-zip, protocol 4) writes

Results and result frames go back to the client as `torch.save` bytes that it reads with plain
`torch.load`. `torch.save` pickles through a Pickler whose `persistent_id` is a Python closure
called for every object pickled (ints, floats, each size and stride tuple) and does several
`isinstance` checks each time, and each tensor is reduced by `Tensor.__reduce_ex__`, which checks
every device, layout and subclass case in Python. Here `persistent_id` answers the common objects
(ints, strings, tuples) with one set lookup, a plain CPU tensor's reduction is made directly, and
torch's header bytes are computed once: a small result with a few tensors is written in about 0.6x
`torch.save`'s time, a result frame (bytes and a few fields) about 4x faster.

Same bytes as `torch.save`:
* torch's `persistent_id` answers only for storages and `nn.Module` classes. A tensor reduces to a
  `TypedStorage`, and that case is written exactly as torch writes it (the same persistent id
  tuple, the same storage keys in the same order, the same raw storage records). For any other
  storage object or a module class in the value, this gives up and calls `torch.save` itself.
* A tensor whose reduction would take `Tensor.__reduce_ex__`'s last branch (exact `torch.Tensor`,
  CPU, strided, not quantized or nested, a `TypedStorage` dtype, no Python state, no hooks, so no
  warning) gets that branch's tuple, made here; every other tensor is reduced by torch.
tests/runtime/test_execution.py compares the bytes with `torch.save`'s for many values.
"""

from __future__ import annotations

import io
import pickle
import sys
from collections import OrderedDict
from typing import Any

_PROTOCOL = 4  # as nnsight's own ResponseModel.pickle(): bytes values stay bytes


# Objects torch.save's persistent_id never answers for (the exact types, not subclasses).
_PLAIN = frozenset({int, float, bool, str, bytes, tuple, list, dict, type(None)})


class _Unusual(Exception):
    """The value holds something torch.save treats specially beyond plain tensors' storages."""


def saved_bytes(value: Any) -> bytes:
    """`torch.save(value, buffer, pickle_protocol=4, _use_new_zipfile_serialization=False)`'s bytes."""
    buffer = io.BytesIO()
    try:
        _LegacyWriter(buffer).write(value)
    except _Unusual:
        import torch

        buffer = io.BytesIO()
        torch.save(value, buffer, pickle_protocol=_PROTOCOL, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


_HEADER: bytes | None = None


def _header() -> bytes:
    """torch's three leading pickles (magic number, protocol version, sys info): constants."""
    global _HEADER
    if _HEADER is None:
        from torch import serialization

        sys_info = {
            "protocol_version": serialization.PROTOCOL_VERSION,
            "little_endian": sys.byteorder == "little",
            "type_sizes": {"short": serialization.SHORT_SIZE, "int": serialization.INT_SIZE,
                           "long": serialization.LONG_SIZE},
        }
        _HEADER = b"".join(pickle.dumps(part, protocol=_PROTOCOL)
                           for part in (serialization.MAGIC_NUMBER, serialization.PROTOCOL_VERSION, sys_info))
    return _HEADER


class _LegacyWriter(pickle.Pickler):
    """torch's `_legacy_save` for values whose only special objects are tensors' `TypedStorage`s."""

    def __init__(self, file: io.BytesIO) -> None:
        import torch

        super().__init__(file, protocol=_PROTOCOL)
        self._file = file
        self._typed = torch.storage.TypedStorage
        self._module = torch.nn.Module
        self._storage_classes = frozenset(torch._storage_classes)
        self._storages: dict[str, tuple[Any, Any]] = {}
        self._dtypes: dict[int, Any] = {}
        self._tensor = torch.Tensor
        self._strided = torch.strided
        self._untyped_dtypes = torch.storage._new_dtypes()  # written by _rebuild_tensor_v3
        self._tls = torch.serialization._serialization_tls

    def write(self, value: Any) -> None:
        self._file.write(_header())
        self.dump(value)
        keys = sorted(self._storages)
        pickle.dump(keys, self._file, protocol=_PROTOCOL)
        if keys:
            from torch import _utils

            for key in keys:
                storage, dtype = self._storages[key]
                # False: a BytesIO has no file descriptor (torch's `_should_read_directly`).
                storage._write_file(self._file, False, True, _utils._element_size(dtype))  # type: ignore[no-untyped-call]

    def reducer_override(self, obj: Any) -> Any:
        # A plain CPU tensor: the reduction `Tensor.__reduce_ex__` returns for it, made directly
        # (its general path checks every device, layout and subclass case in Python first).
        if type(obj) is self._tensor and self._plain(obj):
            import torch

            storage = torch.storage.TypedStorage(  # type: ignore[no-untyped-call]
                wrap_storage=obj.untyped_storage(), dtype=obj.dtype, _internal=True)
            args: tuple[Any, ...] = (storage, obj.storage_offset(), tuple(obj.size()), obj.stride(),
                                     obj.requires_grad, OrderedDict())
            metadata = torch._utils.get_tensor_metadata(obj)  # type: ignore[no-untyped-call]
            return torch._utils._rebuild_tensor_v2, ((*args, metadata) if metadata else args)
        return NotImplemented

    def _plain(self, tensor: Any) -> bool:
        """Whether `Tensor.__reduce_ex__` takes its last branch (`_rebuild_tensor_v2` of a
        `TypedStorage`) for `tensor`, without a warning: anything else it reduces itself."""
        import torch

        return (tensor.device.type == "cpu" and tensor.layout is self._strided and not tensor.is_quantized
                and not tensor.is_nested and tensor.dtype not in self._untyped_dtypes
                and not tensor._backward_hooks and not torch._utils._get_obj_state(tensor)  # type: ignore[no-untyped-call]
                and not self._tls.skip_data)

    def persistent_id(self, obj: Any) -> Any:
        # Called for every object pickled (each int of each size): the common answer first.
        kind = type(obj)
        if kind in _PLAIN:
            return None
        if kind is self._typed:
            return self._storage_id(obj)
        if kind in self._storage_classes or isinstance(obj, self._typed):
            raise _Unusual(obj)  # another storage object: torch.save writes it
        if isinstance(obj, type) and issubclass(obj, self._module):
            raise _Unusual(obj)  # torch.save writes a module class with its source
        return None

    def _storage_id(self, obj: Any) -> tuple[Any, ...]:
        """torch's persistent id of a `TypedStorage` (torch/serialization.py, `_legacy_save`)."""
        import torch
        from torch.serialization import location_tag

        storage = obj._untyped_storage
        dtype = obj.dtype
        pointer = storage.data_ptr()
        if pointer != 0:
            if self._dtypes.setdefault(pointer, dtype) != dtype:
                raise _Unusual(obj)  # torch.save raises its own error for this
        key = str(storage._cdata)
        self._storages.setdefault(key, (storage, dtype))
        return ("storage", getattr(torch, obj._pickle_storage_type()), key, location_tag(storage), obj._size(), None)

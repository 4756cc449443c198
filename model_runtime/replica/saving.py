"""`torch.save` bytes in torch's non-zip format, written without torch's per-object Python hooks.

    data = saved_bytes({"logits": tensor, "n": 3})   # what torch.save(..., non-zip, protocol 4) writes

Results and result frames go back to the client as `torch.save` bytes that it reads with plain
`torch.load`. `torch.save` pickles through a Pickler whose `persistent_id` is a Python closure
called for every object pickled (ints, floats, each size and stride tuple) and does several
`isinstance` checks each time, and each tensor is reduced by `Tensor.__reduce_ex__`, which checks
every device, layout and subclass case in Python. Here `persistent_id` answers the common objects
(ints, strings, tuples) with one set lookup, a plain CPU tensor's reduction is made directly with
its storage's persistent id (no `TypedStorage` object), what is read of torch and torch's header
bytes are computed once per process, and a value with no tensor at all (a result frame: bytes and
a few fields) is written by `pickle.dumps` alone.

Same bytes as `torch.save`:
* A value of plain objects only (exact int, float, bool, str, bytes, None, tuple, list, dict): torch's
  pickler calls its hook for each and gets None, so it writes what `pickle.dumps` writes.
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
    if _plain_only(value):  # no tensor anywhere (a result frame): torch's hook answers None throughout
        return b"".join((_header(), pickle.dumps(value, protocol=_PROTOCOL), _NO_STORAGES))
    buffer = io.BytesIO()
    try:
        _LegacyWriter(buffer).write(value)
    except _Unusual:
        import torch

        buffer = io.BytesIO()
        torch.save(value, buffer, pickle_protocol=_PROTOCOL, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


_CONTAINERS = (tuple, list)
_NO_STORAGES = pickle.dumps([], protocol=_PROTOCOL)  # the storage keys' list when there are none


def _plain_only(value: Any) -> bool:
    """Whether `value` holds only `_PLAIN` objects (exact types, any nesting): then torch.save's
    pickler, whose `persistent_id` answers None for each of them and which has no reducer of its
    own, writes the bytes `pickle.dumps` writes, between torch's header and an empty storage list."""
    pending = [value]
    seen: set[int] = set()
    while pending:
        item = pending.pop()
        kind = type(item)
        if kind not in _PLAIN:
            return False
        if kind is dict or kind in _CONTAINERS:
            if id(item) in seen:
                continue
            seen.add(id(item))
            if kind is dict:
                pending.extend(item)
                pending.extend(item.values())
            else:
                pending.extend(item)
    return True


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


class _Torch:
    """What the writer reads from torch, looked up once per process instead of once per result."""

    def __init__(self) -> None:
        import torch
        from torch import _utils, serialization

        self.torch = torch
        self.tensor = torch.Tensor
        self.typed = torch.storage.TypedStorage
        self.module = torch.nn.Module
        self.strided = torch.strided
        self.untyped_dtypes: Any = torch.storage._new_dtypes()  # written by _rebuild_tensor_v3
        self.tls = serialization._serialization_tls
        self.location_tag = serialization.location_tag
        self.rebuild = _utils._rebuild_tensor_v2
        self.metadata: Any = _utils.get_tensor_metadata
        self.obj_state: Any = _utils._get_obj_state
        self._element_size: Any = _utils._element_size
        self._storage_types: dict[Any, tuple[Any, int]] = {}

    def storage_type(self, dtype: Any) -> tuple[Any, int]:
        """The legacy storage class torch pickles for `dtype` (`TypedStorage._pickle_storage_type`)
        and the dtype's element size."""
        known = self._storage_types.get(dtype)
        if known is None:
            try:
                name = self.torch.storage._dtype_to_storage_type_map()[dtype]
            except KeyError:
                raise _Unusual(dtype) from None  # torch.save raises its own error for it
            known = self._storage_types[dtype] = (getattr(self.torch, name), self._element_size(dtype))
        return known


_TORCH: _Torch | None = None


def _torch() -> _Torch:
    global _TORCH
    if _TORCH is None:
        _TORCH = _Torch()
    return _TORCH


class _StorageRef:
    """A plain tensor's storage in its reduction: `persistent_id` answers its ready persistent id
    (what torch answers for the `TypedStorage` that `Tensor.__reduce_ex__` would put there)."""

    __slots__ = ("pid",)

    def __init__(self, pid: tuple[Any, ...]) -> None:
        self.pid = pid


class _LegacyWriter(pickle.Pickler):
    """torch's `_legacy_save` for values whose only special objects are tensors' `TypedStorage`s."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=_PROTOCOL)
        self._file = file
        self._t = _torch()
        self._storages: dict[str, tuple[Any, int]] = {}  # key → (untyped storage, element size)
        self._dtypes: dict[int, Any] = {}

    def write(self, value: Any) -> None:
        self._file.write(_header())
        self.dump(value)
        keys = sorted(self._storages)
        pickle.dump(keys, self._file, protocol=_PROTOCOL)
        for key in keys:
            storage, element_size = self._storages[key]
            # False: a BytesIO has no file descriptor (torch's `_should_read_directly`).
            storage._write_file(self._file, False, True, element_size)

    def reducer_override(self, obj: Any) -> Any:
        # A plain CPU tensor: the reduction `Tensor.__reduce_ex__` returns for it, made directly
        # (its general path checks every device, layout and subclass case in Python first), with
        # its storage's persistent id computed here rather than from a `TypedStorage` made for it.
        t = self._t
        if type(obj) is t.tensor and self._plain(obj):
            storage = _StorageRef(self._storage_id(obj.untyped_storage(), obj.dtype))
            args: tuple[Any, ...] = (storage, obj.storage_offset(), tuple(obj.size()), obj.stride(),
                                     obj.requires_grad, OrderedDict())
            metadata = t.metadata(obj)
            return t.rebuild, ((*args, metadata) if metadata else args)
        return NotImplemented

    def _plain(self, tensor: Any) -> bool:
        """Whether `Tensor.__reduce_ex__` takes its last branch (`_rebuild_tensor_v2` of a
        `TypedStorage`) for `tensor`, without a warning: anything else it reduces itself."""
        t = self._t
        return (tensor.device.type == "cpu" and tensor.layout is t.strided and not tensor.is_quantized
                and not tensor.is_nested and tensor.dtype not in t.untyped_dtypes
                and not tensor._backward_hooks and not t.obj_state(tensor) and not t.tls.skip_data)

    def persistent_id(self, obj: Any) -> Any:
        # Called for every object pickled (each int of each size): the common answers first.
        kind = type(obj)
        if kind in _PLAIN:
            return None
        if kind is _StorageRef:
            return obj.pid
        t = self._t
        if kind is t.typed:  # a `TypedStorage` in the value itself
            return self._storage_id(obj._untyped_storage, obj.dtype)
        if kind in t.torch._storage_classes or isinstance(obj, t.typed):
            raise _Unusual(obj)  # another storage object: torch.save writes it
        if isinstance(obj, type) and issubclass(obj, t.module):
            raise _Unusual(obj)  # torch.save writes a module class with its source
        return None

    def _storage_id(self, storage: Any, dtype: Any) -> tuple[Any, ...]:
        """torch's persistent id of a `TypedStorage` of `dtype` over the untyped `storage`
        (torch/serialization.py, `_legacy_save`), and the storage recorded for writing."""
        storage_type, element_size = self._t.storage_type(dtype)
        pointer = storage.data_ptr()
        if pointer != 0:
            if self._dtypes.setdefault(pointer, dtype) != dtype:
                raise _Unusual(storage)  # torch.save raises its own error for this
        key = str(storage._cdata)
        self._storages.setdefault(key, (storage, element_size))
        return ("storage", storage_type, key, self._t.location_tag(storage), storage.nbytes() // element_size, None)

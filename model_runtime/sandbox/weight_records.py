"""What weight integrity records about the served model's tensors (sandbox/integrity.py uses it).

* the module tree's tables (`TreeRecord`): which parameter, buffer and submodule each module
  holds, compared by identity on every request;
* each weight's identity (`Identity`, `identity_columns`, `identity_record`): its storage pointer
  and size, offset, shape, stride, dtype, conj/neg bits, `requires_grad` and `.grad`, read by the
  small C++ reader (`native/tensor_identity.cpp`, one pass, packed bytes) where it is built, else
  by maps over the fields in Python.
"""

from __future__ import annotations

import gc
import logging
import operator
import weakref
from collections.abc import Iterable
from itertools import chain, compress, islice, repeat
from typing import Any, NamedTuple

import torch

from model_runtime.sandbox.dict_versions import versions
from model_runtime.sandbox.dispatch_guard import local_shard, module_tree

_log = logging.getLogger(__name__)


def weights_and_buffers(modules: Iterable[torch.nn.Module]) -> list[torch.Tensor]:
    """The parameters and buffers of the served model, each once (tied weights once)."""
    return weights_of_tree(module_tree(modules))


def weights_of_tree(tree: list[torch.nn.Module]) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for module in tree:
        for table in (module._parameters, module._buffers):
            for tensor in table.values():
                if tensor is not None:
                    seen.setdefault(id(tensor), tensor)
    return [local_shard(t) for t in seen.values()]


_TABLES = operator.attrgetter("_modules", "_parameters", "_buffers")  # what the walk reads, per module
_CALL = operator.call
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


class TreeRecord:
    """The module tree as `weights_and_buffers` read it: every module's child, parameter and buffer
    tables, by identity, with their values in order.

    `unchanged()` answers, at C speed (maps over the recorded modules, no bytecode per module or
    tensor), whether a walk now would visit the same modules and tables and find the same objects
    in them: then `weights_and_buffers` would return the same tensors, in the same order. (The
    walk visits each module's `_modules` values in order, so the same tables holding the same
    children reproduce it; the same parameter and buffer tables holding the same tensors give the
    same list.) It answers False on any difference, and whenever the record cannot vouch for
    that: a table that is not a plain dict (a subclass may override `values()`, which the walk
    calls) or a tensor that is not a plain Tensor or Parameter (a DTensor's local shard is read
    through an attribute the record does not follow); the caller then walks the tree.

    Before comparing the tables, `unchanged()` reads CPython's dict version tags (`dict_versions`):
    when every module still has its recorded class and attribute dict, and no recorded dict was
    written since the last comparison that found the tree unchanged (the modules' attribute dicts,
    which hold the three tables; the tables; the dicts of every class in the modules' MROs, where
    a data descriptor would shadow a table), the tables hold the recorded objects, and only their
    classes are compared. Any write, even one that puts back what was there, sends it to the full
    comparison, which records the tags again when it finds the tree unchanged.

    The roots are held weakly, first in the record's own order (tables are compared module by
    module, so the walk's order is not needed): the record never keeps the served model alive.
    """

    def __init__(self, tree: list[torch.nn.Module], roots: list[torch.nn.Module]) -> None:
        root_ids = {id(root) for root in roots}
        self._roots = [weakref.ref(module) for module in tree if id(module) in root_ids]
        self._rest = [module for module in tree if id(module) not in root_ids]
        tree = self.modules
        self.tables: list[dict[str, Any]] = list(chain.from_iterable(map(_TABLES, tree)))
        self.lengths = list(map(len, self.tables))
        self.filled = [bool(n) for n in self.lengths]  # only non-empty tables have values to compare
        self.values = self._values(self.tables)
        self.keys = list(chain.from_iterable(compress(self.tables, self.filled)))
        # A value's class is compared too (`local_shard` depends on it), though its object is the same.
        self.types = list(map(type, self.values))
        weight_tables = self.tables[1::3] + self.tables[2::3]
        self.exact = all(type(table) is dict for table in self.tables) and all(
            value is None or type(value) in _PLAIN_TENSORS for table in weight_tables for value in table.values()
        )
        # What the version tags are read from (see the class doc): fixed with the record.
        self.classes = list(map(type, tree))
        self.dicts = list(map(vars, tree))
        mro = dict.fromkeys(cls for module_class in self.classes for cls in module_class.__mro__)
        self.watched = self.dicts + self.tables + list(map(_class_dict, mro))
        self.tags = versions(self.watched)  # the tree was just read: these tags vouch for it

    @property
    def modules(self) -> list[torch.nn.Module]:
        """The recorded modules, roots first (a root that is gone is left out: `unchanged` is then
        False, as the number of tables differs)."""
        return [root for root in map(_CALL, self._roots) if root is not None] + self._rest

    def _values(self, tables: list[dict[str, Any]]) -> list[Any]:
        return list(chain.from_iterable(map(dict.values, compress(tables, self.filled))))

    def unchanged(self) -> bool:
        if not self.exact:
            return False
        modules = self.modules
        tags = versions(self.watched)  # read before the comparison: a later write moves them
        if tags is not None and tags == self.tags and self._same_objects(modules):
            return all(map(operator.is_, map(type, self.values), self.types))
        tables = list(chain.from_iterable(map(_TABLES, modules)))
        if not all(map(operator.is_, tables, self.tables)) or list(map(len, tables)) != self.lengths:
            return False  # (same length: `all` over the pairs saw every table)
        values = self._values(tables)
        same = all(map(operator.is_, values, self.values)) and all(map(operator.is_, map(type, values), self.types))
        if same and self._same_objects(modules):
            self.tags = tags  # written, but holding what was recorded: these tags vouch for it now
        return same

    def _same_objects(self, modules: list[torch.nn.Module]) -> bool:
        """Every recorded module alive, of its recorded class, with its recorded attribute dict."""
        return (
            len(modules) == len(self.dicts)
            and all(map(operator.is_, map(type, modules), self.classes))
            and all(map(operator.is_, map(vars, modules), self.dicts))
        )

    def put_back(self) -> None:
        """Every recorded table back on its module, holding what it held when recorded (a
        parameter, buffer or submodule replaced or added in any table is undone)."""
        modules = self.modules
        if len(modules) * 3 != len(self.tables):
            return  # a root is gone: nothing left to put back
        tables = iter(self.tables)
        for module, children, parameters, buffers in zip(modules, tables, tables, tables, strict=True):
            entries = vars(module)
            entries["_modules"], entries["_parameters"], entries["_buffers"] = children, parameters, buffers
        keys, values = iter(self.keys), iter(self.values)
        contents = [list(zip(islice(keys, n), islice(values, n), strict=True)) for n in self.lengths]
        for table, items in zip(self.tables, contents, strict=True):
            table.clear()
            table.update(items)


def _class_dict(cls: type) -> dict[str, Any]:
    """The dict a class's attributes live in (`cls.__dict__` is a read-only proxy over it)."""
    (table,) = gc.get_referents(cls.__dict__)
    return table  # type: ignore[no-any-return]


_TENSOR: Any = torch.Tensor
_STORAGE: Any = torch.UntypedStorage
_SHAPE = operator.attrgetter("shape")
_GRAD = operator.attrgetter("grad")
_VERSION = operator.attrgetter("_version")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_DTYPE = operator.attrgetter("dtype")


def identity_columns(tensors: list[torch.Tensor]) -> list[list[Any]]:
    """`Identity.of` of every tensor, as one list per field (the fields' order): read with maps at
    C speed, for every server tensor after every request."""
    storages = list(map(_TENSOR.untyped_storage, tensors))
    return [
        list(map(_STORAGE.data_ptr, storages)), list(map(_STORAGE.nbytes, storages)),
        list(map(_TENSOR.storage_offset, tensors)), list(map(_SHAPE, tensors)), list(map(_TENSOR.stride, tensors)),
        list(map(_DTYPE, tensors)), list(map(_TENSOR.is_conj, tensors)), list(map(_TENSOR.is_neg, tensors)),
        list(map(_REQUIRES_GRAD, tensors)), list(map(operator.is_not, map(_GRAD, tensors), repeat(None))),
    ]


_NATIVE: list[Any] = []  # [native/tensor_identity.cpp's module or None], loaded on first use


def _native() -> Any:
    if not _NATIVE:
        try:
            from model_runtime.sandbox.native.build import IDENTITY_BUILD_DIR, IDENTITY_NAME
            from model_runtime.sandbox.native.loading import load_built

            _NATIVE.append(load_built(IDENTITY_BUILD_DIR, IDENTITY_NAME))
        except Exception as exc:  # missing build, ABI mismatch
            _log.info("integrity identities read in Python: %s: %s", type(exc).__name__, exc)
            _NATIVE.append(None)
    return _NATIVE[0]


def native_identities() -> Any:
    """`native/tensor_identity.cpp`'s `identities`: every tensor's `Identity` packed in one C++
    pass (about 9x cheaper than `identity_columns`), or None where it is not built or does not
    load (then the columns are read in Python; same fields)."""
    module = _native()
    return None if module is None else module.identities


def native_gather() -> Any:
    """`native/tensor_identity.cpp`'s `gather` (the fingerprint's strided samples of host memory,
    concatenated in one C++ pass), or None (then numpy views are concatenated; same bytes)."""
    return getattr(_native(), "gather", None)


def identity_record(tensors: list[torch.Tensor]) -> bytes | None:
    """The native packed identities of `tensors`, or None (not built, or a tensor without a
    plain storage: the columns answer instead)."""
    identities = native_identities()
    if identities is None:
        return None
    try:
        return bytes(identities(tensors))
    except Exception:
        return None


def byte_view(storage: torch.UntypedStorage) -> torch.Tensor:
    raw = torch.empty(0, dtype=torch.uint8, device=storage.device)
    return raw.set_(storage)


class Identity(NamedTuple):
    """What a server tensor is, apart from its bytes (a tuple: made and compared at C speed, for
    every server tensor after every request)."""

    ptr: int
    nbytes: int
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    conj: bool
    neg: bool
    requires_grad: bool
    has_grad: bool

    @classmethod
    def of(cls, t: torch.Tensor) -> Identity:
        storage = t.untyped_storage()
        return cls(
            int(storage.data_ptr()), int(storage.nbytes()), int(t.storage_offset()), tuple(t.shape), tuple(t.stride()),
            t.dtype, t.is_conj(), t.is_neg(), t.requires_grad, t.grad is not None,
        )

"""CPython's per-dict version tag (PEP 509): "this dict was not written since" in one read.

    version = dict_version(table)        # None where the tag cannot be trusted (see below)
    record = VersionedCopy(table, dict)  # a copy of `table`, made again only once it was written

Every write to a dict (item or attribute store, delete, `update`, `clear`, `pop`, `setdefault`,
...) gives it a new version, never reused in the process: an unchanged tag means an unchanged
dict. The snapshots taken around every request (`nnsight_state`'s envoy dicts, `provenance`'s
dicts of the model's state, `model_guard`'s builtins and `sys.modules`, `global_state`'s
environment) read the tag instead of copying and comparing the whole table when nothing was
written, the usual case. The reader is torch's (its compiler guards use it), checked once at
import on every kind of write the snapshotted tables could get; where torch lacks it or the
interpreter does not move the tag on one of them, `dict_version` is None and callers copy and
compare as they would without it.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def _reader() -> Callable[[dict[Any, Any]], int] | None:
    try:
        from torch._C._dynamo.guards import dict_version
    except ImportError:
        return None

    class Probe:
        attribute: int

    def store(probe: Any, value: int) -> None:
        probe.attribute = value  # the interpreter specialises this store after a few runs

    probe = Probe()
    probe.attribute = -1
    entries = vars(probe)  # as the envoys' dicts are held (and so made real)
    module = types.ModuleType("probe")  # as the builtins module's dict is written
    table: dict[Any, Any] = {"key": 0}  # as `sys.modules` is written
    writes: list[tuple[dict[Any, Any], Callable[[], object]]] = [
        *((entries, functools.partial(store, probe, i)) for i in range(32)),
        (entries, functools.partial(setattr, probe, "other", 1)), (entries, functools.partial(delattr, probe, "other")),
        (entries, functools.partial(entries.__setitem__, "item", 1)), (entries, functools.partial(entries.pop, "item")),
        (entries, functools.partial(entries.update, item=2)), (entries, entries.clear),
        (vars(module), functools.partial(setattr, module, "name", 1)),
        (vars(module), functools.partial(delattr, module, "name")),
        (table, functools.partial(table.__setitem__, "key", 1)), (table, functools.partial(table.__delitem__, "key")),
        (table, functools.partial(table.setdefault, "key", 2)), (table, table.popitem),
        (table, functools.partial(table.update, {"a": 1, "b": 2})), (table, functools.partial(table.__ior__, {"c": 3})),
        (table, functools.partial(table.pop, "a")), (table, table.clear),
    ]
    seen = {dict_version(entries), dict_version(vars(module)), dict_version(table)}
    for written, write in writes:
        write()
        version = dict_version(written)
        if not isinstance(version, int) or version in seen:
            return None
        seen.add(version)
    return dict_version


dict_version: Callable[[dict[Any, Any]], int] | None = _reader()


def versions(tables: list[dict[Any, Any]]) -> list[int] | None:
    """Each table's version tag (None without a trustworthy tag)."""
    return list(map(dict_version, tables)) if dict_version is not None else None


class VersionedCopy(Generic[T]):
    """`read(table)`, read again only when `table`'s version tag moved since the last read.

    `current()` returns (the tag, the value read at that tag); the value is shared between callers
    and must not be modified. Without a trustworthy tag, every call reads (tag None)."""

    __slots__ = ("_last", "_read", "table")

    def __init__(self, table: dict[Any, Any], read: Callable[[dict[Any, Any]], T]) -> None:
        self.table = table
        self._read = read
        self._last: tuple[int | None, T] | None = None

    def current(self) -> tuple[int | None, T]:
        if dict_version is None:
            return None, self._read(self.table)
        version = dict_version(self.table)
        last = self._last
        if last is None or last[0] != version:
            last = self._last = (version, self._read(self.table))  # one tuple: readers on other threads see a pair
        return last

    def unchanged_since(self, version: int | None) -> bool:
        """Whether the table is as it was at `version` (False without a tag: then compare)."""
        return version is not None and dict_version is not None and dict_version(self.table) == version

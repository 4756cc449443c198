"""Provenance of Python objects: the server's model state is read-only to a request.

A request may mutate only what it made. The containers of the served model's state (each nnsight
envoy's and each module's lists, dicts and sets: `_edits`, hook tables, `_modules`, the
wrapper's `kwargs`, ...; not the weight tables, which are the weight guard's) are recorded by
identity when the model is first served; the write guard refuses any item or attribute write
into one of them (`ServerState.owns`), whatever name or alias reached it. Their contents are
snapshotted when the model is first served (again only when containers were adopted or a check
did not finish: `begin`) and compared after every request, by length and item identity (a plain
dict by its version tag first: unwritten, it is not read), and
put back if they changed (`verify_and_restore`): whatever slipped
past the guards does not reach the next request (a callable planted in an envoy's state would
otherwise run inside other users' requests).
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from itertools import chain, compress, islice
from operator import is_
from typing import Any

from model_runtime.sandbox.dict_versions import versions

_CONTAINERS = (list, dict, set, OrderedDict)
# The weight tables are the weight guard's: the server re-places parameters (activation from a
# host copy, tensor-parallel shards), and putting an old table back would revert the weights.
_WEIGHT_TABLES = frozenset({"_parameters", "_buffers"})


class ServerState:
    """The model's state containers, by identity, with a snapshot of each one's contents."""

    def __init__(self, model: Any) -> None:
        self._where: dict[int, str] = {}
        self._by_id: dict[int, Any] = {}
        self._containers: list[Any] = []
        self._empty: list[Any] = []  # the containers empty at the last split
        self._filled: list[Any] = []  # the others, plain lists first, then dicts, then the rest
        self._lengths: list[int] = []  # the filled ones' lengths at the last capture
        self._partitioned = -1  # how many containers the last split was made from
        self._stale = True  # the snapshot may not be what the containers hold (see `begin`)
        envoys = [model]
        while envoys:
            envoy = envoys.pop()
            state = vars(envoy)
            self._record_all(state, f"envoy {state.get('path', '?')}")
            envoys.extend(state.get("_children", ()))
        for name, module in model._module.named_modules():
            self._record_all(vars(module), f"module {name or '<root>'}")
        self.capture()

    def _record_all(self, state: dict[str, Any], where: str) -> None:
        for key, value in state.items():
            if key in _WEIGHT_TABLES:
                continue
            if type(value) in _CONTAINERS and id(value) not in self._where:
                self._where[id(value)] = f"{where}.{key}"
                self._by_id[id(value)] = value
                self._containers.append(value)

    def adopt(self, container: Any, where: str) -> None:
        """Record a container the server made after first serve (nnsight's tables, adopted by
        `nnsight_state.RuntimeState`); the next `capture` snapshots it."""
        if type(container) in _CONTAINERS and id(container) not in self._where:
            self._where[id(container)] = where
            self._by_id[id(container)] = container
            self._containers.append(container)

    def begin(self) -> None:
        """At the start of a request: the snapshot is what the request starts from. It still holds
        after a verification that finished (what changed was put back to it), so it is taken again
        only when containers were adopted since, or the last verification did not finish. (A
        level change builds a new `ServerState`; a change made between two requests, e.g. by a
        finaliser run at collection, is undone when the next request ends.)"""
        if self._stale or len(self._containers) != self._partitioned:
            self.capture()

    def capture(self) -> None:
        """Snapshot the contents now (when the model is first served, and by `begin`)."""
        self._stale = False
        # Read at C speed (a large model has tens of thousands of these, nearly all empty hook
        # tables). The containers are split into those empty at the last split (still empty: one
        # `any` over them, about 3x cheaper than reading every length) and the filled ones, whose
        # lengths are recorded and whose items are flattened into one list per kind (plain
        # lists', dicts' keys and values; with the lengths, every item's container is known).
        if len(self._containers) != self._partitioned or any(self._empty):
            lengths = list(map(len, self._containers))
            self._empty = list(compress(self._containers, map(operator.not_, lengths)))
            filled = list(compress(self._containers, lengths))
            self._lists = [c for c in filled if type(c) is list]
            self._dicts = [c for c in filled if type(c) is dict]
            self._others = [c for c in filled if type(c) is not list and type(c) is not dict]
            self._filled = self._lists + self._dicts + self._others
            self._partitioned = len(self._containers)
        self._lengths = list(map(len, self._filled))
        self._dict_versions = versions(self._dicts)  # before their contents: a later write moves them
        self._list_items = list(chain.from_iterable(self._lists))
        self._dict_keys = list(chain.from_iterable(self._dicts))
        self._dict_values = list(chain.from_iterable(map(dict.values, self._dicts)))
        self._other_copies = list(map(_copy, self._others))

    def _unchanged(self) -> bool:
        """Whether every container holds what `capture` saw. The empty ones still empty and the
        filled ones' lengths equal first: then the flattened items line up container by container."""
        return (
            not any(self._empty)
            and list(map(len, self._filled)) == self._lengths
            and all(map(is_, chain.from_iterable(self._lists), self._list_items))
            and self._dicts_unchanged()
            and all(map(_same, self._others, self._other_copies))
        )

    def _dicts_unchanged(self) -> bool:
        """The filled plain dicts: unwritten since the capture (their version tags, `dict_versions`),
        or holding the same keys and values (then their tags are recorded again)."""
        now = versions(self._dicts)
        if now is not None and now == self._dict_versions:
            return True
        same = list(chain.from_iterable(self._dicts)) == self._dict_keys and all(
            map(is_, chain.from_iterable(map(dict.values, self._dicts)), self._dict_values))
        if same:
            self._dict_versions = now  # written back as they were (read before the comparison)
        return same

    def _snapshots(self) -> dict[int, Any]:
        """Each filled container's snapshot (`_copy`'s form), rebuilt from the flattened capture
        (an empty one's is absent)."""
        snapshots: dict[int, Any] = dict(zip(map(id, self._others), self._other_copies, strict=True))
        items, keys, values = iter(self._list_items), iter(self._dict_keys), iter(self._dict_values)
        for container, length in zip(self._filled, self._lengths, strict=False):
            if type(container) is list:
                snapshots[id(container)] = list(islice(items, length))
            elif type(container) is dict:
                snapshots[id(container)] = (list(islice(keys, length)), list(islice(values, length)))
        return snapshots

    def owns(self, obj: Any) -> bool:
        return self._by_id.get(id(obj)) is obj

    def verify_and_restore(self) -> list[str]:
        """Put back every container that changed; the names of those that had."""
        self._stale = True  # until the check (and any restore) finished
        if self._unchanged():
            self._stale = False
            return []
        snapshots = self._snapshots()
        changed = []
        # (Containers adopted after the capture are not in its split: checked from the next one.)
        for container in islice(self._containers, self._partitioned):
            snapshot = snapshots.get(id(container), [])
            if not _same(container, snapshot):
                changed.append(self._where[id(container)])
                _restore(container, snapshot)
        self._stale = False
        return changed


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return (list(value), list(value.values()))
    if isinstance(value, set):
        return set(value)
    return list(value)


def _same(container: Any, snapshot: Any) -> bool:
    if isinstance(container, dict):
        keys, values = snapshot if snapshot else ([], [])
        return len(container) == len(keys) and list(container) == keys and all(
            map(operator.is_, container.values(), values))
    if isinstance(container, set):
        return container == (snapshot or set())
    return len(container) == len(snapshot) and all(map(operator.is_, container, snapshot))


def _restore(container: Any, snapshot: Any) -> None:
    container.clear()
    if isinstance(container, dict):
        if snapshot:
            container.update(zip(*snapshot, strict=True))
    elif isinstance(container, set):
        container.update(snapshot)
    else:
        container.extend(snapshot)

"""Provenance of Python objects: the server's state is read-only to a request.

A request may mutate only what it made. Two rules make every other container read-only to it
(the write guard refuses item and attribute writes into one, the attribute guard its mutating
methods: `ServerState.owns`), whatever name or alias reached it:

* Recorded: every list, dict and set reachable from the served model when a request starts:
  each envoy's, controller's and module's containers (`_edits`, hook tables, `_modules`, the
  wrapper's `kwargs`, ...; found once, at first serve), and those of the other nnsight objects
  behind them, which nnsight creates or replaces after the model was first served: the
  interleaver (`mediators`, `sourced`, `counts`, `observers`, ...), each module's source state
  (`routes`, the `.source` instrumentation's `Compiled` tables) and the process-wide `.source`
  cache (walked at every request's start). The weight tables (`_parameters`, `_buffers`) are
  the weight guard's.
* Adopted: a container the request reads as an attribute of an object it did not create (a
  library object, a module, an envoy), or as an item of a server container, is the server's for
  the rest of the request, even if the server made it during this request (the recorded set is
  taken at the start).

The recorded containers' contents are snapshotted at the start of each request and compared
after it, by length and item identity, and put back if they changed (`verify_and_restore`):
whatever slipped past the guards does not reach the next request (a callable planted in an
envoy's or the interleaver's state would otherwise run inside other users' requests).
"""

from __future__ import annotations

import enum
import operator
import sys
from collections import OrderedDict, deque
from collections.abc import MutableMapping, MutableSequence, MutableSet
from typing import Any

_CONTAINERS = (list, dict, set, OrderedDict)
# What adoption makes read-only: any mutable container, subclasses and weak ones included.
_MUTABLE = (list, dict, set, bytearray, deque, MutableMapping, MutableSet, MutableSequence)
# The weight tables are the weight guard's: the server re-places parameters (activation from a
# host copy, tensor-parallel shards), and putting an old table back would revert the weights.
_WEIGHT_TABLES = frozenset({"_parameters", "_buffers"})


class ServerState:
    """The model's state containers, by identity, with a snapshot of each one's contents."""

    def __init__(self, model: Any) -> None:
        # What keeps its identity for the model's life is found once, at first serve: the
        # modules' containers (the write guard refuses assigning new ones) and those of the
        # envoys and the modules' controllers (nnsight builds them with the envoy tree). The
        # rest of nnsight's objects behind them (each module's source state, the interleaver,
        # its fragments) replace their containers at run time (a new `routes` list per
        # registration, new per-run tables per trace): walked again at every request's start.
        roots: list[tuple[Any, str]] = []
        static: dict[int, tuple[Any, str]] = {}
        for name, module in model._module.named_modules():
            where = f"module {name or '<root>'}"
            for key, value in vars(module).items():
                if key in _WEIGHT_TABLES:
                    continue
                if type(value) in _CONTAINERS:
                    static[id(value)] = (value, f"{where}.{key}")
                elif _is_server_type(type(value)):
                    roots.append((value, f"{where}.{key}"))
        envoys = [model]
        while envoys:
            envoy = envoys.pop()
            roots.append((envoy, f"envoy {vars(envoy).get('path', '?')}"))
            envoys.extend(vars(envoy).get("_children", ()))
        everything, live = _walk(roots, static, enter_structure=True)
        self._live_roots = live  # the non-structural nnsight objects first serve reaches
        changing, _ = _walk(self._roots(), static, enter_structure=False)
        self._static = {key: found for key, found in everything.items() if key not in changing}
        self._static_containers = [container for container, _ in self._static.values()]
        self._static_by_id = {key: container for key, (container, _) in self._static.items()}
        self._subtrees: dict[int, tuple[Any, tuple[Any, ...], dict[int, tuple[Any, str]]]] = {}
        self._adopted: dict[int, Any] = {}
        self.capture()

    def _roots(self) -> list[tuple[Any, str]]:
        roots = list(self._live_roots)
        source = sys.modules.get("nnsight.intervention.source")
        if source is not None:  # `.source`'s process-wide cache of instrumented forwards
            roots.append((vars(source).get("FORWARD_CACHE", {}), "nnsight .source cache"))
        return roots

    def capture(self) -> None:
        """Find the state and snapshot its contents now (at the start of each request: the server
        itself creates and replaces state between requests, e.g. nnsight's per-run interleaver
        tables or a level change that re-places the weights)."""
        changing: dict[int, tuple[Any, str]] = {}
        subtrees: dict[int, tuple[Any, tuple[Any, ...], dict[int, tuple[Any, str]]]] = {}
        for root, where in self._roots():
            # A root whose attributes are the same objects (and containers of the same lengths) as
            # at the last request's start holds what it held then: its walk is reused.
            mark = _fingerprint(root)
            cached = self._subtrees.get(id(root))
            if cached is not None and cached[0] is root and _same_print(cached[1], mark):
                found = cached[2]
            else:
                found, _ = _walk([(root, where)], self._static, enter_structure=False)
            subtrees[id(root)] = (root, mark, found)
            changing.update(found)
        self._subtrees = subtrees
        self._changing = changing
        self._containers = self._static_containers + [container for container, _ in changing.values()]
        self._by_id = self._static_by_id.copy()
        self._by_id.update((key, container) for key, (container, _) in changing.items())
        self._per_run = {key for key, (_, where) in changing.items() if ".interleaver." in where}
        self._adopted = {}
        # Checked at C speed where it can be (a large model has tens of thousands of these,
        # nearly all empty hook tables): lengths first, then the items of the non-empty ones.
        self._lengths = list(map(len, self._containers))
        self._full = [(c, _copy(c)) for c in self._containers if len(c)]

    def owns(self, obj: Any) -> bool:
        key = id(obj)
        return self._by_id.get(key) is obj or self._adopted.get(key) is obj

    def adopt(self, value: Any) -> Any:
        """Mark a container the request got from the server as the server's; returns it."""
        if isinstance(value, _MUTABLE):
            self._adopted[id(value)] = value
        return value

    def verify_and_restore(self) -> list[str]:
        """Put back every container that changed; the names of those that had (nnsight's per-run
        interleaver tables, which every trace changes, are put back without being named)."""
        self._adopted = {}
        if list(map(len, self._containers)) == self._lengths and all(_same(c, snap) for c, snap in self._full):
            return []
        snapshots = {id(c): snap for c, snap in self._full}
        changed = []
        for container, length in zip(self._containers, self._lengths, strict=True):
            snapshot = snapshots.get(id(container), [])
            if len(container) != length or not _same(container, snapshot):
                if id(container) not in self._per_run:
                    changed.append((self._static.get(id(container)) or self._changing[id(container)])[1])
                _restore(container, snapshot)
        return changed


def _walk(roots: list[tuple[Any, str]], known: dict[int, tuple[Any, str]], *, enter_structure: bool
          ) -> tuple[dict[int, tuple[Any, str]], list[tuple[Any, str]]]:
    """Every container reachable from `roots` through containers, tuples and nnsight's objects,
    by id with its label (depth first, each object once; modules are never entered, envoys and
    controllers only when `enter_structure`), plus the other nnsight objects reached."""
    found: dict[int, tuple[Any, str]] = dict(known) if enter_structure else {}
    seen: set[int] = set(known)
    live: list[tuple[Any, str]] = []
    kinds = _KINDS
    # (object, its parent's label, its key in the parent; None for a root): labels are built
    # only for what is walked, and only what can hold server state is pushed at all.
    stack: list[tuple[Any, str, str | None]] = [(obj, where, None) for obj, where in roots]
    while stack:
        obj, parent, key = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        kind = kinds[type(obj)]
        where = f"{parent}.{key}" if key else parent
        if kind is _Kind.CONTAINER:
            found[id(obj)] = (obj, where)
            values = obj.values() if isinstance(obj, dict) else obj
            stack.extend((value, where, "[]") for value in values if kinds[type(value)] is not _Kind.LEAF)
        elif kind is _Kind.SEQUENCE:  # a NamedTuple's items are labelled by field
            fields = getattr(obj, "_fields", None) or ("",) * len(obj)
            pairs = zip(obj, fields, strict=False)
            stack.extend((v, where, f) for v, f in pairs if kinds[type(v)] is not _Kind.LEAF)
        elif kind is _Kind.SERVER or (kind is _Kind.STRUCTURE and (enter_structure or key is None)):
            if kind is _Kind.SERVER:
                live.append((obj, where))
            state = getattr(obj, "__dict__", None)
            if isinstance(state, dict):
                stack.extend((v, where, k) for k, v in state.items() if kinds[type(v)] is not _Kind.LEAF)
            for slot in getattr(type(obj), "__slots__", ()):
                value = getattr(obj, slot, None) if isinstance(slot, str) else None
                if kinds[type(value)] is not _Kind.LEAF:
                    stack.append((value, where, slot))
    return found, live


def _fingerprint(obj: Any) -> tuple[Any, ...]:
    """An object's attributes (a container: itself) and the lengths of the containers among them;
    the objects themselves, not their ids, so that none is freed and its id reused."""
    if type(obj) in _CONTAINERS:
        return (obj,), (len(obj),)
    state = getattr(obj, "__dict__", None)
    values = list(state.values()) if isinstance(state, dict) else []
    values.extend(getattr(obj, slot, None) for slot in getattr(type(obj), "__slots__", ()) if isinstance(slot, str))
    return tuple(values), tuple(len(v) if type(v) in _CONTAINERS else -1 for v in values)


def _same_print(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a[0]) == len(b[0]) and all(map(operator.is_, a[0], b[0])) and a[1] == b[1]


def _is_server_type(kind: type) -> bool:
    """Types whose instances hold the served model's runtime state (nnsight's)."""
    return str(getattr(kind, "__module__", "")).startswith("nnsight")


class _Kind(enum.Enum):
    CONTAINER = "container"  # recorded, and its items walked
    SEQUENCE = "sequence"  # a tuple (NamedTuples too): its items walked
    SERVER = "server"  # an nnsight object: its attributes walked
    STRUCTURE = "structure"  # an envoy or a module's controller: built once, walked at first serve
    LEAF = "leaf"  # holds no server state a request could reach (or is a module: static)


class _Kinds(dict[type, _Kind]):
    """What the walk does with each type, decided once per type."""

    def __missing__(self, kind: type) -> _Kind:
        import torch

        if kind in _CONTAINERS:
            decided = _Kind.CONTAINER
        elif issubclass(kind, tuple) and (kind is tuple or _is_server_type(kind)):
            decided = _Kind.SEQUENCE
        elif _is_server_type(kind) and not issubclass(kind, (torch.Tensor, torch.nn.Module)):
            decided = _Kind.STRUCTURE if kind.__name__.endswith(("Envoy", "Controller")) else _Kind.SERVER
        else:
            decided = _Kind.LEAF
        self[kind] = decided
        return decided


_KINDS = _Kinds()


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return (list(value), list(value.values()))
    if isinstance(value, set):
        return set(value)
    return list(value)


def _same(container: Any, snapshot: Any) -> bool:
    # By identity only: an `==` could call a planted object's `__eq__` inside the server's clean-up.
    if isinstance(container, dict):
        keys, values = snapshot if snapshot else ([], [])
        return len(container) == len(keys) and all(map(operator.is_, container, keys)) and all(
            map(operator.is_, container.values(), values))
    if isinstance(container, set):
        return len(container) == len(snapshot or ()) and set(map(id, container)) == set(map(id, snapshot or ()))
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

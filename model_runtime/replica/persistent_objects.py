"""The persistent-objects map a request's pickle is read against, walked once per model state.

    objects = persistent_objects(model)   # == model._remoteable_persistent_objects(), every time

nnsight resolves the ids a request's pickle refers to (`Interleaver`, `Module:<path>` for every
envoy, `Tokenizer`, `Pipeline`...) through `model._remoteable_persistent_objects()`, which walks
the whole envoy tree on every call: 2 ms per request on a 32-layer model. The walk's result
depends only on what it reads, so this module records exactly that and walks again only when any
of it changed:

* the envoys the walk visited, in order, and each one's class (the class supplies the walk's
  methods);
* per envoy: the classes and lengths of its `_child_map` and `_children`, the children in each
  (by identity, in order) and its `path` (the same str object). The walk reads nothing else but
  `_module`: the children it recurses into come from the two containers, the map's key from
  `path`, and its value, `_module`, is read from the envoys on every call, as the walk reads it.

The same children in the same order reproduce the same walk from the same root, so when every
recorded column is identical now, a walk would visit the recorded envoys with the recorded paths:
the map is the recorded keys with the envoys' modules. Anything else (a PEFT swap or any
`_update`, an envoy nnsight or a request created, a replaced or edited container, a new path or
class, a new model object) fails the check, and the map is walked again with nnsight's own
method. The check is maps over the recorded envoys at C speed, no bytecode per envoy; it still
reads each envoy and its two containers, which is most of what a request pays for the walk
(those objects are out of the caches after a trace). The root's `interleaver` and the model's
preprocessor and pipeline attributes are read afresh on every call, as nnsight reads them.

The record is trusted only where the walk is the one described above: the model's class uses
nnsight's own `_remoteable_persistent_objects` (TransformersModel's or the base one) and
`modules`, every envoy's class nnsight's `_named_children` with no class attribute shadowing
what the walk reads, plain dict and list containers and str paths. Otherwise every call is
nnsight's fresh walk.

Provenance: the entries are kept as a tuple of pairs (nothing can be planted into it) and every
call hands out a new dict, so what a request does to the map it was given reaches no later
request; and the entries are served only while the tree still holds exactly the recorded objects.
"""

from __future__ import annotations

import operator
import threading
import weakref
from itertools import chain
from typing import Any

_FIELDS = ("_child_map", "_children", "path", "_module")
_READ = operator.attrgetter(*_FIELDS)
_COLUMNS = tuple(map(operator.attrgetter, _FIELDS))
_DEREF = weakref.ref.__call__


def _walks() -> tuple[Any, Any, Any, Any]:
    """nnsight's functions whose walk the record reproduces (imported on first use: torch)."""
    from nnsight.intervention.envoy import Envoy
    from nnsight.modeling.mixins.remotable import Remotable
    from nnsight.modeling.transformers import TransformersModel

    return Envoy, Remotable, TransformersModel, Envoy._named_children


def _preprocessor_ids(model: Any) -> dict[str, str] | None:
    """Attribute -> persistent id that `model`'s map adds after the walk ({} for the base
    implementation), or None when its implementation is not one the record reproduces."""
    envoy, remotable, transformers_model, _ = _walks()
    method = getattr(type(model), "_remoteable_persistent_objects", None)
    if type(model).modules is not envoy.modules:
        return None
    if method is transformers_model._remoteable_persistent_objects:
        from nnsight.modeling.transformers import _PERSISTENT

        return dict(_PERSISTENT)
    if method is remotable._remoteable_persistent_objects:
        return {}
    return None


def _plain_envoy_class(cls: type) -> bool:
    _, _, _, named_children = _walks()
    return (
        getattr(cls, "_named_children", None) is named_children
        and getattr(cls, "__getattribute__", None) is object.__getattribute__
        and not any(name in vars(klass) for klass in cls.__mro__ for name in _FIELDS)
    )


class _Record:
    """The envoy tree as the walk read it, and the `Module:<path>` entries it produced.

    Envoys are held by weak reference (every envoy leads back to the model, through the
    interleaver): the record never keeps a model alive. Modules are not recorded: the map's values
    are read from the envoys on every call, as the walk reads them."""

    def __init__(self, envoys: list[Any]) -> None:
        rows = list(map(_READ, envoys))
        child_maps, children, paths, _ = (list(column) for column in zip(*rows, strict=True))
        self.refs = tuple(map(weakref.ref, envoys))
        # The classes of the envoys and their containers, in one column (one pass to check).
        self.types = tuple(map(type, chain(envoys, child_maps, children)))
        self.lengths = list(map(len, chain(child_maps, children)))
        self.paths = tuple(paths)  # compared by identity: the same str objects, so the same keys
        # Every child of a visited envoy is a visited envoy: children are kept as walk positions.
        position = {id(envoy): index for index, envoy in enumerate(envoys)}
        members = chain(chain.from_iterable(map(dict.values, child_maps)), chain.from_iterable(children))
        self.members = tuple(position.get(id(member), -1) for member in members)
        # The expected children, picked from the envoys in one C call (a tuple even for 0 or 1).
        self.pick_members = operator.itemgetter(*self.members, 0, 0)
        self.exact = (
            all(type(m) is dict for m in child_maps)
            and all(type(c) is list for c in children)
            and all(type(path) is str for path in paths)
            and -1 not in self.members
            and all(map(_plain_envoy_class, set(map(type, envoys))))
        )
        self.keys = tuple(f"Module:{path}" for path in paths)

    def modules_if_unchanged(self) -> list[Any] | None:
        """The envoys' modules (the map's values) if a walk now would visit the recorded envoys
        with the recorded paths, else None (C speed: a few maps over the recorded envoys, no
        bytecode per envoy). Objects are compared by identity (`is`), never by `==`, which a
        planted object could answer."""
        envoys = list(map(_DEREF, self.refs))
        if not all(map(operator.is_, map(type, envoys), self.types)):
            return None  # (a collected envoy is None: not its recorded class)
        try:  # a column per field (no tuple per envoy: allocation is what costs most in a request)
            child_maps, children, paths, modules = (list(map(read, envoys)) for read in _COLUMNS)
        except AttributeError:
            return None
        if not (
            all(map(operator.is_, map(type, chain(envoys, child_maps, children)), self.types))
            and all(map(operator.is_, paths, self.paths))
            and list(map(len, chain(child_maps, children))) == self.lengths
            and all(map(
                operator.is_,
                chain(chain.from_iterable(map(dict.values, child_maps)), chain.from_iterable(children)),
                self.pick_members(envoys),
            ))
        ):
            return None
        return modules


class PersistentObjects:
    """One served model's map, walked once per state of its envoy tree."""

    def __init__(self, model: Any) -> None:
        self._model = weakref.ref(model)
        self._ids = _preprocessor_ids(model)
        self._record: _Record | None = None
        self.walks = 0  # how many times the tree was walked (for tests and benchmarks)

    def get(self) -> dict[str, Any]:
        """A new dict equal to `model._remoteable_persistent_objects()` now."""
        model = self._model()
        if model is None:
            raise ReferenceError("the model this map belongs to is gone")
        if self._ids is None:
            return dict(model._remoteable_persistent_objects())
        objects: dict[str, Any] = {"Interleaver": model.interleaver}  # read first, as nnsight does
        record = self._record
        if record is None or (modules := record.modules_if_unchanged()) is None:
            return self._walk(model)
        objects.update(zip(record.keys, modules, strict=True))
        self._add_preprocessors(model, objects)
        return objects

    def _walk(self, model: Any) -> dict[str, Any]:
        """nnsight's own walk, recorded: the record is read first, so anything nnsight's call
        changes (a lookup that wraps a new envoy) makes the next check fail."""
        self.walks += 1
        self._record = None
        try:
            record: _Record | None = _Record(model.modules())
        except AttributeError:  # a tree nnsight's walk cannot read either: its own error below
            record = None
        objects = model._remoteable_persistent_objects()
        entries = [(key, value) for key, value in objects.items() if key.startswith("Module:")]
        # Kept only if it gives exactly what nnsight returned (the same entries, in the same order)
        # and nnsight's call left the tree as recorded.
        modules = record.modules_if_unchanged() if record is not None and record.exact else None
        if record is not None and modules is not None and len(entries) == len(modules) and all(
            key == recorded and value is module
            for (key, value), recorded, module in zip(entries, record.keys, modules, strict=True)
        ):
            self._record = record
        return dict(objects)

    def _add_preprocessors(self, model: Any, objects: dict[str, Any]) -> None:
        for attr, pid in (self._ids or {}).items():
            value = getattr(model, attr)
            if value is not None:
                objects[pid] = value


_REGISTRY: weakref.WeakKeyDictionary[Any, PersistentObjects] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def persistent_objects(model: Any) -> dict[str, Any]:
    """`model._remoteable_persistent_objects()`, without the walk while the envoy tree is as it
    was at the last walk. Call it where nnsight's method would be called (under the replica's
    request lock: one request at a time per model)."""
    return cache_for(model).get()


def cache_for(model: Any) -> PersistentObjects:
    """The map cache of a served model (made on first use)."""
    with _LOCK:
        cache = _REGISTRY.get(model)
        if cache is None:
            cache = _REGISTRY[model] = PersistentObjects(model)
        return cache

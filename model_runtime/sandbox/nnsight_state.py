"""nnsight's runtime state on the served model: snapshotted before each request, verified after.

`provenance.ServerState` records the containers that exist when the model is first served. nnsight
makes and replaces more as it runs, none of them through a name a request chooses:

- on every module, its `State` (`module.__dict__["__nnsight__"]`: the routes to the interleaver,
  the body the controller runs, the instrumented body and its `Compiled` once `.source` is first
  used) and its controller (`module.__dict__["forward"]`);
- the instrumented forwards' `Compiled` tables, in nnsight's process-wide `FORWARD_CACHE`;
- the server's envoy tree (each envoy's attributes) and its interleaver's per-run tables.

`RuntimeState` reads these by identity (no walk into greenlets, mediators or frames: only the
module dicts, the `State` slots, the cache and the interleaver's own attributes; the envoys' dicts
by their version tag, entry by entry only once written) when the model is first served and,
after each request, puts back whatever changed. The record is the state every request starts
from: after a request the model holds it again (what changed was put back), and it is read again
right after a verification that adopted something (below) or put back a change. A change made
between two requests (a finaliser of an object a request left behind, run at collection) is
therefore undone too, when the next request ends. One change is nnsight's own:
a module sourced for the first time (a request touched `.source`) gets an instrumented body and a
`Compiled`. It is adopted only if that `Compiled` equals a fresh compile of the module's original
forward (so a request cannot have edited it on the way); otherwise the sourcing is undone and
the next use builds it again. Adopted tables (`Compiled.lines`) are server-owned containers from
then on: the write guard refuses them, and `ServerState` verifies them like the others.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from itertools import chain, repeat
from operator import is_
from typing import Any

from model_runtime.sandbox.dict_versions import dict_version, versions

_STATE = "__nnsight__"
_STATE_SLOTS = ("routes", "body", "original", "sourced", "compiled")
_HEAD = operator.itemgetter(_STATE, "forward")
_FIRST = operator.itemgetter(0)
_SLOTS = operator.attrgetter(*_STATE_SLOTS)
_ROUTES = operator.attrgetter("routes")


def _source_module() -> Any:
    from nnsight.intervention import source

    return source


class RuntimeState:
    """The served model's nnsight runtime state, by identity; `adopt` registers new server tables."""

    def __init__(self, model: Any, adopt: Callable[[Any, str], None]) -> None:
        self._adopt = adopt
        self._modules = [(name or "<root>", module) for name, module in model._module.named_modules()]
        envoys, stack = [], [model]
        while stack:
            envoy = stack.pop()
            envoys.append(envoy)
            stack.extend(vars(envoy).get("_children", ()))
        self._envoys = envoys
        self._envoy_dicts: list[dict[str, Any]] = [vars(envoy) for envoy in envoys]
        # Every module nnsight wrapped has its State and controller; the others must not gain them.
        wrapped = [(name, module) for name, module in self._modules if _STATE in vars(module)
                   and "forward" in vars(module)]
        self._wrapped = wrapped
        self._wrapped_dicts = [vars(module) for _, module in wrapped]
        self._plain = [(name, module) for name, module in self._modules if (name, module) not in wrapped]
        self._interleaver = getattr(model, "interleaver", None)
        self._cache: dict[Any, Any] = _source_module().FORWARD_CACHE
        for name, module in self._modules:  # tables nnsight built before first serve
            state = module.__dict__.get(_STATE)
            if state is not None and state.compiled is not None:
                adopt(state.compiled.lines, f"module {name} source lines")
        self.capture()

    def begin(self) -> None:
        """At the start of a request: nothing to read while the record holds (the last
        verification put back or recorded everything); read again only if it did not finish."""
        if self._stale:
            self.capture()

    # Read at C speed (maps over the module dicts and State objects, no bytecode per module):
    # this runs twice per request.
    def _fast_view(self) -> tuple[list[Any], ...]:
        heads = list(map(_HEAD, self._wrapped_dicts))  # (State, controller) per wrapped module
        states = list(map(_FIRST, heads))
        routes = list(map(_ROUTES, states))
        return heads, list(map(_SLOTS, states)), list(chain.from_iterable(routes)), list(map(len, routes))

    def capture(self) -> None:
        """Record the state now (at first serve, and at a request's start when the record is stale)."""
        self._stale = False
        self._view = self._fast_view()
        dicts = self._envoy_dicts
        self._envoy_keys = list(chain.from_iterable(dicts))
        self._envoy_values = list(chain.from_iterable(map(dict.values, dicts)))
        self._envoy_lengths = list(map(len, dicts))
        self._envoy_versions = versions(dicts)
        self._cache_view = dict(self._cache)
        if self._interleaver is not None:
            entries = vars(self._interleaver)
            self._interleaver_keys = list(entries)
            self._interleaver_values = list(entries.values())
            fixed = [(key, value) for key, value in entries.items() if key not in _PER_RUN]
            self._interleaver_fixed_keys = [key for key, _ in fixed]
            self._interleaver_fixed_values = [value for _, value in fixed]
            self._interleaver_tables = [(value, _copy(value)) for key, value in entries.items()
                                        if key in _TABLES_PUT_BACK]

    def _module_entry(self, module: Any) -> tuple[Any, ...]:
        entries = module.__dict__
        state = entries.get(_STATE)
        slots = (tuple(state.routes), *(getattr(state, s) for s in _STATE_SLOTS[1:])) if state is not None else ()
        return state, entries.get("forward"), slots

    def verify_and_restore(self) -> list[str]:
        """Put back what changed; the names of what had (nnsight's own first sourcing is adopted)."""
        self._adopted: set[int] = set()
        self._stale = True  # until every check below found the record intact
        changed: list[str] = []
        intact = True
        try:
            same = self._fast_view() == self._view
        except (KeyError, AttributeError):  # a State or controller gone
            same = False
        if not same or any(_STATE in vars(module) or "forward" in vars(module) for _, module in self._plain):
            intact = False
            changed.extend(self._modules_changed())
        dicts = self._envoy_dicts
        now = versions(dicts)
        if now is None or now != self._envoy_versions:  # written since recorded: compare
            if list(chain.from_iterable(dicts)) != self._envoy_keys or not all(
                    map(is_, chain.from_iterable(map(dict.values, dicts)), self._envoy_values)):
                intact = False
                changed.extend(self._envoys_changed())
            else:  # written back as they were
                self._envoy_versions = now
        if self._cache != self._cache_view:
            intact = False
            changed.extend(self._cache_changed())
        # The interleaver's per-run attributes change in every run; they are put back as recorded.
        changed.extend(self._interleaver_changed())
        if not intact:  # the record again, now: what is adopted, and nothing made after this point
            self.capture()
        self._stale = False
        return changed

    def _modules_changed(self) -> list[str]:
        heads, slots, items, lengths = self._view
        changed: list[str] = []
        start = 0
        for (name, module), (state, forward), slot, length in zip(self._wrapped, heads, slots, lengths, strict=True):
            before = (state, forward, (tuple(items[start:start + length]), *slot[1:]))
            start += length
            now = self._module_entry(module)
            if now != before:
                changed.extend(self._module_changed(name, module, before, now))
        for name, module in self._plain:
            if _STATE in vars(module) or "forward" in vars(module):
                vars(module).pop(_STATE, None)
                vars(module).pop("forward", None)
                changed.append(f"module {name} nnsight state")
        return changed

    def _envoys_changed(self) -> list[str]:
        changed: list[str] = []
        start = 0
        for current, length in zip(self._envoy_dicts, self._envoy_lengths, strict=True):
            keys = self._envoy_keys[start:start + length]
            values = self._envoy_values[start:start + length]
            start += length
            if list(current) != keys or not all(map(is_, current.values(), values)):
                current.clear()
                current.update(zip(keys, values, strict=True))
                changed.append(f"envoy {current.get('path', '?')}")
        return changed

    def _module_changed(self, name: str, module: Any, before: tuple[Any, ...], now: tuple[Any, ...]) -> list[str]:
        state, forward, slots = before
        entries = module.__dict__
        if now[0] is state and now[1] is forward and state is not None and self._sourced_by_nnsight(state, slots):
            return []  # nnsight's first `.source` of this module: adopted
        if state is not None:
            for slot, value in zip(_STATE_SLOTS, (list(slots[0]), *slots[1:]), strict=True):
                setattr(state, slot, value)
            entries[_STATE] = state
        else:
            entries.pop(_STATE, None)
        if forward is not None:
            entries["forward"] = forward
        else:
            entries.pop("forward", None)
        return [f"module {name} nnsight state"]

    def _sourced_by_nnsight(self, state: Any, before: tuple[Any, ...]) -> bool:
        """Whether the only change is nnsight sourcing the module, with an unedited `Compiled`."""
        routes, _body, original, sourced, compiled = before
        if sourced or compiled is not None or state.sourced is not True or state.original is not original:
            return False
        if tuple(state.routes) != routes:
            return False
        made: Any = state.compiled
        fresh: Any = None
        source = _source_module()
        try:
            inner = _instrumented_function(original)
            fresh = source.compile_source(inner)
        except Exception:
            return False
        if not isinstance(made, source.Compiled) or self._cache.get(inner.__code__) is not made:
            return False
        if _tables(made) != _tables(fresh):
            return False
        self._adopted.add(id(made))
        self._adopt(_tables(made)[1], "a module's source lines")
        return True

    def _cache_changed(self) -> list[str]:
        cache, before = self._cache, self._cache_view
        if len(cache) == len(before) and all(cache.get(k, _MISSING) is v for k, v in before.items()):
            return []
        # What nnsight added for a module it sourced (adopted above) stays; anything else is undone.
        added = {k: v for k, v in cache.items() if k not in before}
        if all(cache.get(k, _MISSING) is v for k, v in before.items()) and all(
                id(v) in self._adopted for v in added.values()):
            return []
        cache.clear()
        cache.update(before)
        cache.update({k: v for k, v in added.items() if id(v) in self._adopted})
        return ["nnsight's forward cache"]

    def _interleaver_changed(self) -> list[str]:
        """Put the interleaver's attributes back as they were between requests. Its per-run tables
        and flags change in every run (nnsight fills `counts`, sets `busy`, replaces `mediators`):
        they are put back without being reported."""
        if self._interleaver is None:
            return []
        entries = vars(self._interleaver)
        keys, values = self._interleaver_keys, self._interleaver_values
        changed: list[str] = []
        # The attributes that are not per-run, compared at C speed (each still the same object).
        if not all(map(is_, map(entries.get, self._interleaver_fixed_keys, repeat(_MISSING)),
                       self._interleaver_fixed_values)):
            changed = [key for key, value in zip(keys, values, strict=True)
                       if key not in _PER_RUN and entries.get(key, _MISSING) is not value]
        entries.update(zip(keys, values, strict=True))
        if changed or len(entries) != len(keys):  # (after the update, a longer dict has keys added)
            changed += [key for key in entries if key not in keys]
            entries.clear()
            entries.update(zip(keys, values, strict=True))
        for table, contents in self._interleaver_tables:
            if (table or contents) and not _same(table, contents):  # (both empty: the usual case)
                _put_back(table, contents)
        return [f"interleaver.{key}" for key in changed]


# The envoys' dicts are compared entry by entry only once written (`dict_versions`).
_DICT_VERSION = dict_version


def _tables(compiled: Any) -> tuple[Any, Any, Any]:
    return compiled.names, compiled.lines, compiled.source


def _instrumented_function(original: Any) -> Any:
    """The function nnsight's `instrument` compiles for a module's forward (decorators peeled)."""
    import inspect
    import types

    source = _source_module()
    fn = original
    call = vars(type(fn)).get("__call__")
    if not (inspect.isfunction(fn) or inspect.ismethod(fn)) and isinstance(call, types.FunctionType):
        fn = fn.__call__  # a callable instance: instrument() compiles its __call__
    inner, _chain = source.decorator_chain(fn.__func__ if inspect.ismethod(fn) else fn)
    return inner


_MISSING = object()
# The interleaver's attributes nnsight itself sets during every run.
_PER_RUN = frozenset({"mediators", "observers", "counts", "parked", "sourced", "busy", "interleaving", "batcher"})
# Per-run tables whose contents are put back too. Not `counts`: nnsight reads it only relative to
# the counts at a worker's start (`Mediator.counts_at_start`), so a value planted there shifts
# nothing, and it holds one entry per location the model ever ran (copying it would cost the most).
_TABLES_PUT_BACK = frozenset({"mediators", "observers", "parked", "sourced"})


def _copy(value: Any) -> Any:
    if type(value) is dict:
        return list(value.items())
    if type(value) in (list, set):
        return list(value)
    return None


def _same(value: Any, contents: list[Any]) -> bool:
    items = list(value.items()) if type(value) is dict else list(value)
    return len(items) == len(contents) and all(
        (a is b) or (type(a) is tuple and a == b) for a, b in zip(items, contents, strict=True)
    )


def _put_back(value: Any, contents: list[Any]) -> None:
    value.clear()
    if type(value) is dict:
        value.update(contents)
    elif type(value) is set:
        value.update(contents)
    else:
        value.extend(contents)

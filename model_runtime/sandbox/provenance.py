"""Provenance of Python objects: the server's model state is read-only to a request.

A request may mutate only what it made. The containers of the served model's state (each nnsight
envoy's and each module's lists, dicts and sets: `_edits`, hook tables, `_modules`, the
wrapper's `kwargs`, ...) are recorded by identity when the model is first served; the write
guard refuses any item or attribute write into one of them (`ServerState.owns`), whatever name
or alias reached it. After every request each recorded container is compared with its snapshot,
by length and item identity, and put back if it changed (`verify_and_restore`): whatever slipped
past the guards does not reach the next request (a callable planted in an envoy's state would
otherwise run inside other users' requests).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

_CONTAINERS = (list, dict, set, OrderedDict)


class ServerState:
    """The model's state containers, by identity, with a snapshot of each one's contents."""

    def __init__(self, model: Any) -> None:
        self._snapshots: dict[int, tuple[Any, Any, str]] = {}
        envoys = [model]
        while envoys:
            envoy = envoys.pop()
            state = vars(envoy)
            self._record_all(state, f"envoy {state.get('path', '?')}")
            envoys.extend(state.get("_children", ()))
        for name, module in model._module.named_modules():
            self._record_all(vars(module), f"module {name or '<root>'}")

    def _record_all(self, state: dict[str, Any], where: str) -> None:
        for key, value in state.items():
            if type(value) in _CONTAINERS and id(value) not in self._snapshots:
                self._snapshots[id(value)] = (value, _copy(value), f"{where}.{key}")

    def owns(self, obj: Any) -> bool:
        return id(obj) in self._snapshots and self._snapshots[id(obj)][0] is obj

    def verify_and_restore(self) -> list[str]:
        """Put back every container that changed; the names of those that had."""
        changed = []
        for container, snapshot, where in self._snapshots.values():
            if not _same(container, snapshot):
                changed.append(where)
                _restore(container, snapshot)
        return changed


def _copy(value: Any) -> Any:
    return list(value.items()) if isinstance(value, dict) else list(value)


def _same(container: Any, snapshot: list[Any]) -> bool:
    if len(container) != len(snapshot):
        return False
    if isinstance(container, dict):
        return all(container.get(k, _MISSING) is v for k, v in snapshot)
    if isinstance(container, set):
        return all(item in container for item in snapshot)
    return all(a is b for a, b in zip(container, snapshot, strict=True))


def _restore(container: Any, snapshot: list[Any]) -> None:
    container.clear()
    if isinstance(container, dict):
        container.update(snapshot)
    elif isinstance(container, set):
        container.update(snapshot)
    else:
        container.extend(snapshot)


_MISSING = object()

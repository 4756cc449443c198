"""Server-side field management: `metadata.managedFields` per manager, and server-side apply.

As the API server does it (simplified where noted in tests/README.md):
* every write names a manager: `?fieldManager=`, else the User-Agent up to its first "/"
  (`OpenAPI-Generator` for the generated Python clients, `kopf` for Kopf);
* an Update (create, PUT, JSON/merge patch) makes its manager own the fields it changed and takes
  them from every other manager; removed fields belong to nobody;
* an Apply (`application/apply-patch+yaml`) makes its manager own exactly the fields of the applied
  configuration; a field another manager owns with a different value is a conflict (409, one
  cause per field) unless `?force=true`, which takes it; fields the manager applied before and
  now leaves out are removed unless another manager owns them;
* entries are per (manager, operation, subresource); lists are atomic (one field), as for custom
  resources without `x-kubernetes-list-type`.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

Obj = dict[str, Any]
Path = tuple[str, ...]
# Metadata the server owns; users manage labels, annotations, finalizers and ownerReferences.
_USER_METADATA = ("labels", "annotations", "finalizers", "ownerReferences")


def manager_of(field_manager: str | None, user_agent: str) -> str:
    return (field_manager or user_agent.split("/")[0] or "unknown")[:128]


def _leaves(value: Any, prefix: Path) -> dict[Path, Any]:
    if isinstance(value, dict) and value:
        out: dict[Path, Any] = {}
        for key, child in value.items():
            out.update(_leaves(child, (*prefix, str(key))))
        return out
    return {prefix: value}


def field_values(obj: Obj, *, status_subresource: bool, subresource: str | None) -> dict[Path, Any]:
    """Leaf path → value of the fields a manager can own in `obj` for a write to `subresource`."""
    if subresource == "status":
        return _leaves(obj["status"], ("status",)) if "status" in obj else {}
    out: dict[Path, Any] = {}
    for key, value in obj.items():
        if key in ("apiVersion", "kind") or (key == "status" and status_subresource):
            continue
        if key == "metadata":
            for meta_key in _USER_METADATA:
                if meta_key in (value or {}):
                    out.update(_leaves(value[meta_key], ("metadata", meta_key)))
            continue
        out.update(_leaves(value, (key,)))
    return out


def to_fields_v1(paths: set[Path]) -> Obj:
    root: Obj = {}
    for path in sorted(paths):
        node = root
        for part in path:
            node = node.setdefault(f"f:{part}", {})
    return root


def from_fields_v1(fields: Obj, prefix: Path = ()) -> set[Path]:
    children = {k: v for k, v in fields.items() if k.startswith("f:")}
    if not children:
        return {prefix} if prefix else set()
    out: set[Path] = set()
    for key, child in children.items():
        out |= from_fields_v1(child, (*prefix, key[2:]))
    return out


def _entries(obj: Obj | None) -> list[Obj]:
    return copy.deepcopy(((obj or {}).get("metadata") or {}).get("managedFields") or [])


def _owned_elsewhere(entries: list[Obj], manager: str, operation: str, subresource: str) -> dict[Path, str]:
    owners: dict[Path, str] = {}
    for entry in entries:
        if (entry["manager"], entry["operation"], entry.get("subresource", "")) == (manager, operation, subresource):
            continue
        for path in from_fields_v1(entry.get("fieldsV1") or {}):
            owners.setdefault(path, entry["manager"])
    return owners


def _overlaps(path: Path, other: Path) -> bool:
    shorter = min(len(path), len(other))
    return path[:shorter] == other[:shorter]


def apply_conflicts(current: Obj, applied: Obj, manager: str, *, status_subresource: bool) -> list[tuple[Path, str]]:
    """(field, other manager) for each applied field another manager owns with a different value."""
    mine = field_values(applied, status_subresource=status_subresource, subresource=None)
    have = field_values(current, status_subresource=status_subresource, subresource=None)
    owners = _owned_elsewhere(_entries(current), manager, "Apply", "")
    conflicts = []
    for path, owner in sorted(owners.items()):
        for applied_path, value in mine.items():
            if _overlaps(path, applied_path) and have.get(applied_path, _MISSING) != value:
                conflicts.append((path, owner))
                break
    return conflicts


_MISSING = object()


def _set(obj: Obj, path: Path, value: Any) -> None:
    node = obj
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = copy.deepcopy(value)


def _remove(obj: Obj, path: Path) -> None:
    """Remove the field, and the maps it leaves empty."""
    parents = [obj]
    for part in path[:-1]:
        child = parents[-1].get(part)
        if not isinstance(child, dict):
            return
        parents.append(child)
    parents[-1].pop(path[-1], None)
    for depth in range(len(parents) - 1, 0, -1):
        if parents[depth]:
            break
        parents[depth - 1].pop(path[depth - 1], None)


def merge_applied(current: Obj, applied: Obj, manager: str, *, status_subresource: bool, force: bool) -> Obj:
    """The object after `manager` applies `applied` (conflicts already checked); ownership is
    recorded by `record` afterwards with the applied field set."""
    result = copy.deepcopy(current)
    mine = field_values(applied, status_subresource=status_subresource, subresource=None)
    for path, value in mine.items():
        _set(result, path, value)
    previous = next((from_fields_v1(e.get("fieldsV1") or {}) for e in _entries(current)
                     if (e["manager"], e["operation"], e.get("subresource", "")) == (manager, "Apply", "")), set())
    others = _owned_elsewhere(_entries(current), manager, "Apply", "")
    if force:
        others = {p: o for p, o in others.items() if not any(_overlaps(p, q) for q in mine)}
    for path in previous - set(mine):
        if not any(_overlaps(path, other) for other in others):
            _remove(result, path)
    return result


def record(old: Obj | None, new: Obj, *, manager: str, subresource: str | None, status_subresource: bool,
           applied: Obj | None = None) -> None:
    """Update `new`'s managedFields (in place) for a write by `manager`: an Update, or an Apply of
    `applied`. Changed fields move to the writer; fields that are gone belong to nobody."""
    sub = subresource or ""
    operation = "Update" if applied is None else "Apply"
    values_new = field_values(new, status_subresource=status_subresource, subresource=subresource)
    values_old = field_values(old, status_subresource=status_subresource, subresource=subresource) if old else {}
    removed = set(values_old) - set(values_new)
    taken = {p for p, v in values_new.items() if values_old.get(p, _MISSING) != v}
    if applied is not None:
        owned = set(field_values(applied, status_subresource=status_subresource, subresource=None))
        taken &= owned
    else:
        owned = taken
    entries = _entries(old)
    target = next((e for e in entries if (e["manager"], e["operation"], e.get("subresource", ""))
                   == (manager, operation, sub)), None)
    mine = set() if target is None or applied is not None else from_fields_v1(target.get("fieldsV1") or {})
    mine = {p for p in mine if p not in removed} | owned
    kept: list[Obj] = []
    for entry in [*entries, *([] if target is not None else [None])]:  # order kept; a new entry goes last
        if entry is target or entry is None:
            if mine:
                written = {"manager": manager, "operation": operation, "apiVersion": new.get("apiVersion", ""),
                           "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "fieldsType": "FieldsV1",
                           "fieldsV1": to_fields_v1(mine)}
                if sub:
                    written["subresource"] = sub
                kept.append(written)
            continue
        paths = {p for p in from_fields_v1(entry.get("fieldsV1") or {})
                 if p not in removed and not any(_overlaps(p, q) for q in taken)}
        if paths:
            entry["fieldsV1"] = to_fields_v1(paths)
            kept.append(entry)
    new.setdefault("metadata", {})["managedFields"] = kept


def without_times(obj: Obj) -> Obj:
    """`obj` with its managedFields' timestamps blanked (they alone do not make a write a change)."""
    out = dict(obj)
    meta = dict(out.get("metadata") or {})
    meta["managedFields"] = [{k: v for k, v in e.items() if k != "time"} for e in meta.get("managedFields") or []]
    out["metadata"] = meta
    return out

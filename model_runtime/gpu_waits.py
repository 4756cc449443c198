"""Which HOT replicas wait for a GPU share that another replica still holds, read from Ray's GCS.

A replica going HOT leases its planned GPU share with a placement group (replica/gpu_lease.py)
and waits up to `LEASE_TIMEOUT_S` while another model's replica still holds it (a rolling
update, a model moving off the GPU). The group's name says whose it is, since when and until
when (`group_name`), so anyone in the Ray cluster (the gateway) can tell from the placement
group table, at once: the model waits (its group is PENDING), for which GPU, since when, and
which models' groups hold that GPU on its node (CREATED, same resource). Pure: the table is
`ray.util.placement_group_table()`'s answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ndif_operator.api.pinning import pinned_gpu_index

LEASE_TIMEOUT_S = 300.0  # a GPU the plan gave us but another replica still holds (rolling update)
_PREFIX = "ndif-gpu-lease "


def group_name(model: str, node: str, since: float, timeout_s: float) -> str:
    """The lease group's name: the prefix, then JSON (model key, node id, epoch seconds)."""
    return _PREFIX + json.dumps({"model": model, "node": node, "since": round(since, 3), "timeout_s": timeout_s},
                                separators=(",", ":"), sort_keys=True)


def _parse_name(name: object) -> dict[str, Any] | None:
    if not isinstance(name, str) or not name.startswith(_PREFIX):
        return None
    try:
        fields = json.loads(name[len(_PREFIX):])
    except ValueError:
        return None
    return fields if isinstance(fields, dict) and isinstance(fields.get("model"), str) else None


@dataclass(frozen=True, slots=True)
class GpuWait:
    model: str
    resources: dict[str, float]
    node: str
    since: float  # epoch seconds
    timeout_s: float
    holders: tuple[str, ...]  # the models whose replicas hold the share on that node (may be empty)

    def _what(self) -> str:
        gpu = pinned_gpu_index(self.resources)
        share = ", ".join(f"{k}: {v:g}" for k, v in sorted(self.resources.items()))
        held = (f"held by {', '.join(self.holders)}" if self.holders
                else "held by a replica that is letting go of it")
        return f"GPU {gpu if gpu is not None else '?'} ({share}) on node {self.node[:12]}, {held}"

    def condition_message(self) -> str:
        """The wait in words that do not change while it lasts (what the operator writes into the
        Ready condition: a status rewritten only when the wait changes, not every poll)."""
        return (f"waiting since {_rfc3339(self.since)} for {self._what()}; gives up at "
                f"{_rfc3339(self.since + self.timeout_s)}")

    def describe(self, now: float) -> str:
        """The wait with how long it has lasted (the gateway's 503 to a client)."""
        waited = max(0.0, now - self.since)
        return (f"waiting for {self._what()}: {waited:.0f} s so far, gives up after {self.timeout_s:.0f} s")

    def as_json(self, now: float) -> dict[str, Any]:
        """The gateway's `/status` entry: `message` is stable while the wait lasts, `waited_s` live."""
        return {"resources": self.resources, "node": self.node, "since": self.since, "timeout_s": self.timeout_s,
                "holders": list(self.holders), "message": self.condition_message(),
                "waited_s": round(max(0.0, now - self.since), 1)}


def _rfc3339(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def gpu_waits(table: Mapping[str, Mapping[str, Any]]) -> dict[str, GpuWait]:
    """Model key → its replica's wait for a GPU share (the oldest, if several replicas wait)."""
    held: list[tuple[str, str, set[str]]] = []  # (model, node, resource names) of the groups holding
    pending: list[tuple[dict[str, Any], dict[str, float]]] = []
    for group in table.values():
        fields = _parse_name(group.get("name"))
        bundles = group.get("bundles") or {}
        resources = {str(k): float(v) for bundle in bundles.values() for k, v in (bundle or {}).items()}
        if fields is None or not resources:
            continue
        if group.get("state") == "CREATED":
            nodes = {str(n) for n in (group.get("bundles_to_node_id") or {}).values()}
            held.extend((fields["model"], node, set(resources)) for node in nodes)
        elif group.get("state") in ("PENDING", "RESCHEDULING"):
            pending.append((fields, resources))
    waits: dict[str, GpuWait] = {}
    for fields, resources in sorted(pending, key=lambda p: float(p[0].get("since", 0))):
        model, node = str(fields["model"]), str(fields.get("node", ""))
        if model in waits:
            continue
        holders = sorted({m for m, n, names in held if n == node and names & set(resources)})
        waits[model] = GpuWait(model=model, resources=resources, node=node, since=float(fields.get("since", 0)),
                               timeout_s=float(fields.get("timeout_s", LEASE_TIMEOUT_S)), holders=tuple(holders))
    return waits

"""The pass's writes to ModelDeployments: status, metadata (finalizer, assignments), release.

A status is computed whole from the pass's `Observation` (status.py), compared with the status
on the object as read, and written only when it differs, as a whole (`KubeApi.replace_status`):
fields that are no longer true disappear, and an unchanged status costs no request. Each written
condition transition posts one Event. Metadata writes are merge patches conditional on the
resourceVersion read; a 409 or 404 means the object moved on, which its watch event reports:
the pass asks for a quick re-run and moves on.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from ndif_operator.operator import metrics
from ndif_operator.operator.entries import Entry
from ndif_operator.operator.kube import KubeApi, KubeError
from ndif_operator.operator.loop import PassOutcome, Wake
from ndif_operator.operator.recorder import EventRecorder
from ndif_operator.operator.requests import ASSIGNMENTS_ANNOTATION, encode_assignments
from ndif_operator.operator.status import Observation, compute_status, status_changed, transitions
from ndif_operator.planning import Decision

logger = logging.getLogger("ndif_operator.status_writer")

_STALE_RETRY_SECONDS = 0.05


class StatusWriter:
    def __init__(self, api: KubeApi, finalizer: str, recorder: EventRecorder) -> None:
        self.api = api
        self.finalizer = finalizer
        self.recorder = recorder
        self.writes = 0

    async def write_status(self, entry: Entry, obs: Observation, now: datetime) -> dict[str, Any]:
        """The new status (written only when it differs from the object's)."""
        old = entry.status
        new = compute_status(obs, old, now)
        metrics.observe_deployment(entry.namespace, entry.name, entry.md.spec.level if entry.md else None, new)
        if not status_changed(old, new):
            return new
        try:
            written = await self.api.replace_status(entry.namespace, entry.name, new)
        except KubeError as exc:
            if exc.status == 404:
                return new  # deleted meanwhile
            raise
        entry.obj["metadata"]["resourceVersion"] = written["metadata"]["resourceVersion"]
        entry.obj["status"] = written.get("status") or new
        self.writes += 1
        metrics.STATUS_WRITES.inc()
        for change in transitions(old, new):
            # Placed and Scheduled reasons read as they are (PlacedHot, ScheduledDedicated, ScheduleEnded).
            plain = change.condition in ("Placed", "Scheduled")
            reason = change.reason if plain else f"{change.condition}{change.reason}"
            await self.recorder.post(entry.obj, reason, f"{change.condition}={change.status}: {change.message}"
                                     .rstrip(": "), warning=change.warning)
        return new

    async def ensure_metadata(self, entry: Entry, decision: Decision | None, outcome: PassOutcome) -> None:
        """Our finalizer and the replica assignments, in one conditional write when either is missing."""
        meta = entry.obj["metadata"]
        if entry.deleting:
            return
        patch: dict[str, Any] = {}
        finalizers = list(meta.get("finalizers") or [])
        if self.finalizer not in finalizers:
            patch["finalizers"] = [*finalizers, self.finalizer]
        if decision is not None:
            wanted = encode_assignments(decision)
            if (meta.get("annotations") or {}).get(ASSIGNMENTS_ANNOTATION) != wanted:
                patch["annotations"] = {ASSIGNMENTS_ANNOTATION: wanted}
        if not patch:
            return
        patch["resourceVersion"] = meta["resourceVersion"]  # finalizer lists are replaced: be conditional
        try:
            written = await self.api.patch_metadata(entry.namespace, entry.name, patch)
        except KubeError as exc:
            if exc.status not in (404, 409):
                raise
            outcome.want(Wake.RETRY, _STALE_RETRY_SECONDS)  # stale read: the next pass sees the new object
            return
        entry.obj["metadata"] = written["metadata"]

    async def release(self, entry: Entry, outcome: PassOutcome) -> None:
        """Drop our finalizer from a deleted object whose Serve app is gone."""
        meta = entry.obj["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if self.finalizer not in finalizers:
            return
        remaining = [f for f in finalizers if f != self.finalizer]
        try:
            await self.api.patch_metadata(entry.namespace, entry.name,
                                          {"finalizers": remaining or None, "resourceVersion": meta["resourceVersion"]})
        except KubeError as exc:
            if exc.status not in (404, 409):
                raise
            outcome.want(Wake.RETRY, _STALE_RETRY_SECONDS)
            return
        await self.recorder.post(entry.obj, "Released", "the model's Serve application is removed; finalizer "
                                 "released", warning=False)

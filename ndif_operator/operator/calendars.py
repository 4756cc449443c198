"""The operator's CalendarSchedules: watched, read when due, folded into each planner pass.

CalendarSchedules live in the operator's namespace (with the Secrets holding their keys); a watch
keeps them in memory and wakes the planner when one changes, so an idle pass reads nothing for
them. In the pass of a RayService, `schedule_for` reads the calendars that govern it when they are
due (calendar_sync.py) and returns their bookings, one more input to `plan()`; `finish` colours
the events that cannot be honoured, writes each schedule's status when it changed, and asks the
loop to run again when the next calendar read is due or the next booking starts or ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from ndif_operator.operator.calendar_sync import (
    CalendarState,
    ClientFactory,
    google_client,
    mark_conflicts,
    refresh,
    schedule_status,
    state_from_object,
)
from ndif_operator.operator.entries import Entry
from ndif_operator.operator.kube import KubeApi, KubeError
from ndif_operator.operator.loop import PassOutcome, Wake
from ndif_operator.planning import Decision
from ndif_operator.planning.schedule import unplaced_bookings
from ndif_operator.scheduling import DeploymentRef, Schedule, ScheduleProblem

logger = logging.getLogger("ndif_operator.calendars")

Target = tuple[str, str]
_WATCH_SECONDS = 300
_WATCH_BACKOFF_MAX = 60.0
# lastSyncTime alone is rewritten at most this often: a poll that changes nothing writes nothing.
_SYNC_TIME_REFRESH = timedelta(minutes=15)


def _merge(schedules: Iterable[Schedule]) -> Schedule:
    bookings = sorted((b for s in schedules for b in s.bookings), key=lambda b: (b.start, b.key))
    return Schedule(tuple(bookings), tuple(p for s in schedules for p in s.problems))


def _generation(obj: Mapping[str, Any] | None) -> Any:
    return (obj or {}).get("metadata", {}).get("generation")


def _without_sync_time(status: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in status.items() if k != "lastSyncTime"}


class Calendars:
    def __init__(self, api: KubeApi, namespace: str, default_ray_service: str, *,
                 client_factory: ClientFactory = google_client) -> None:
        self.api = api
        self.namespace = namespace
        self.default_ray_service = default_ray_service
        self.client_factory = client_factory
        self._objects: dict[str, dict[str, Any]] = {}  # namespace/name → the object as last seen or written
        self._states: dict[str, CalendarState] = {}
        self._invalid: dict[str, str] = {}
        self._refs: dict[Target, list[DeploymentRef]] = {}  # each target's models at its last pass

    # --- the watch -----------------------------------------------------------------------------

    def observe(self, kind: str, obj: Mapping[str, Any]) -> bool:
        """One watch event; True when the planner should run (a calendar appeared, changed or went)."""
        meta = obj.get("metadata") or {}
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        if kind == "DELETED":
            self._objects.pop(key, None)
            self._invalid.pop(key, None)
            return self._states.pop(key, None) is not None
        previous = self._objects.get(key)
        self._objects[key] = dict(obj)
        before = self._states.get(key)
        try:
            self._states[key] = state_from_object(obj, before)
            self._invalid.pop(key, None)
        except ValidationError as exc:
            self._invalid[key] = str(exc.errors()[0].get("msg"))
            self._states.pop(key, None)
            logger.warning("CalendarSchedule %s is invalid: %s", key, self._invalid[key])
            return before is not None
        return before is None or _generation(previous) != _generation(obj)

    async def watch(self, on_change: Callable[[], None]) -> None:
        """Follow the CalendarSchedules of the operator's namespace until cancelled."""
        resource_version = ""
        backoff = 1.0
        trouble: str | None = None
        while True:
            try:
                if not resource_version:
                    items, resource_version = await self.api.list_calendar_schedules(self.namespace)
                    seen = {f"{i['metadata']['namespace']}/{i['metadata']['name']}" for i in items}
                    changed = any([self.observe("ADDED", item) for item in items])
                    for gone in set(self._objects) - seen:
                        changed = self.observe("DELETED", self._objects[gone]) or changed
                    if changed:
                        on_change()
                async for kind, body in self.api.watch_calendar_schedules(self.namespace, resource_version,
                                                                          _WATCH_SECONDS):
                    resource_version = body.get("metadata", {}).get("resourceVersion") or resource_version
                    if kind != "BOOKMARK" and self.observe(kind, body):
                        on_change()
                if trouble is not None:
                    logger.warning("watching CalendarSchedules in %s again", self.namespace)
                trouble, backoff = None, 1.0
            except KubeError as exc:
                if exc.status == 410:
                    resource_version = ""  # too old: list again
                    continue
                if exc.status == 404:
                    logger.info("no CalendarSchedule CRD installed: calendar scheduling is off")
                    return
                if str(exc) != trouble:
                    logger.warning("watching CalendarSchedules in %s failed (%s); retrying with backoff",
                                   self.namespace, exc)
                    trouble = str(exc)
                resource_version = ""
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _WATCH_BACKOFF_MAX)

    # --- the planner pass ----------------------------------------------------------------------

    def _governs(self, state: CalendarState, target: Target) -> bool:
        namespace = state.spec.namespace or state.namespace
        return (namespace, state.spec.ray_service or self.default_ray_service) == target

    async def _read_secret(self, namespace: str, name: str, key: str) -> bytes | None:
        data = await self.api.read_secret(namespace, name)
        value = (data or {}).get(key)
        return value.encode() if value is not None else None

    async def schedule_for(self, target: Target, live: list[Entry], now: datetime) -> Schedule | None:
        """The bookings of every calendar governing `target`, each calendar read first when due."""
        keys = sorted(k for k, s in self._states.items() if self._governs(s, target))
        if not keys:
            return None
        refs = [DeploymentRef(e.key, e.md.spec.model.repo_id if e.md is not None else None) for e in live]
        self._refs[target] = refs
        for key in keys:
            state = await refresh(self._states[key], now, refs, read_secret=self._read_secret,
                                  client_factory=self.client_factory)
            self._states[key] = state.resolved(refs, now)
        return _merge(self._states[k].schedule for k in keys)

    async def poll(self, now: datetime) -> bool:
        """Read the calendars that are due between passes; True when a pass must follow (their
        bookings, problems or readability changed). Reads Google only, never the Kubernetes API."""
        changed = False
        for target, refs in self._refs.items():
            for key in sorted(k for k, s in self._states.items() if self._governs(s, target)):
                before = self._states[key]
                after = (await refresh(before, now, refs, read_secret=self._read_secret,
                                       client_factory=self.client_factory)).resolved(refs, now)
                self._states[key] = after
                changed = changed or (after.schedule, after.reason) != (before.schedule, before.reason)
        return changed

    async def finish(self, target: Target, decisions: Mapping[str, Decision], now: datetime,
                     outcome: PassOutcome) -> dict[str, str]:
        """After planning: conflicts (model key → why), coloured events, schedule statuses, timers."""
        conflicts: dict[str, str] = {}
        for key in sorted(k for k, s in self._states.items() if self._governs(s, target)):
            state = self._states[key]
            unplaced = unplaced_bookings(state.schedule, decisions, now)
            conflicts.update({p.key: p.message for p in unplaced if p.key})
            problems: list[ScheduleProblem] = [*state.schedule.problems, *unplaced]
            state = await mark_conflicts(state, problems, read_secret=self._read_secret,
                                         client_factory=self.client_factory)
            self._states[key] = state
            await self._write_status(key, state, problems, now, outcome)
        self.want_timers(target, now, outcome)
        return conflicts

    def want_timers(self, target: Target, now: datetime, outcome: PassOutcome) -> None:
        """Ask the loop to read each governing calendar when due and to plan when a booking edge comes."""
        for state in (s for s in self._states.values() if self._governs(s, target)):
            if state.next_attempt is not None:
                outcome.want(Wake.CALENDAR_POLL, max(0.0, (state.next_attempt - now).total_seconds()))
            edge = state.schedule.next_change(now)
            if edge is not None:
                outcome.want(Wake.BOOKING_EDGE, max(0.0, (edge - now).total_seconds()))

    async def _write_status(self, key: str, state: CalendarState, problems: list[ScheduleProblem],
                            now: datetime, outcome: PassOutcome) -> None:
        obj = self._objects.get(key)
        if obj is None:
            return
        old = dict(obj.get("status") or {})
        new = schedule_status(state, problems, old, now)
        stale_sync = old.get("lastSyncTime") != new.get("lastSyncTime") and (
            not old.get("lastSyncTime") or state.last_sync is None
            or state.last_sync - datetime.fromisoformat(str(old["lastSyncTime"])) >= _SYNC_TIME_REFRESH)
        if _without_sync_time(old) == _without_sync_time(new) and not stale_sync:
            return
        namespace, name = key.split("/", 1)
        try:
            written = await self.api.replace_calendar_schedule_status(namespace, name, new)
        except KubeError as exc:
            if exc.status == 404:
                return
            outcome.retry = True
            outcome.errors.append(f"CalendarSchedule {key} status: {exc}")
            return
        self._objects[key] = {**obj, "status": written.get("status") or new,
                              "metadata": written.get("metadata") or obj.get("metadata")}

    def describe(self, key: str) -> str:
        """Which CalendarSchedule(s) hold `key`'s bookings (for the model's status)."""
        names = [k for k, s in self._states.items() if any(b.key == key for b in s.schedule.bookings)]
        return ", ".join(sorted(names))


"""The planner pass: every ModelDeployment → plan → one serveConfigV2 per RayService → statuses.

The single writer of the operator: everything it writes (serveConfigV2, statuses, finalizers,
assignments, the evaluator cache, Jobs, Events) is written from one pass at a time, which
`PlannerLoop` (loop.py) schedules. Per RayService a pass sizes every live model (estimation.py),
sets activations on request (activation.py), plans and patches the config (serve_config_patch.py),
then writes each status and metadata only where they differ (status_writer.py), and releases
the finalizer of deleted models whose app is gone from the patched config. API errors of one
RayService do not stop the others; they make the pass incomplete, and the loop retries it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from ndif_operator.api import Level
from ndif_operator.operator import metrics
from ndif_operator.operator.activation import Activations
from ndif_operator.operator.cache_store import CacheStore
from ndif_operator.operator.calendars import Calendars
from ndif_operator.operator.entries import Entry, for_each, parse_entry, reject_duplicates
from ndif_operator.operator.estimation import Estimations, Estimator
from ndif_operator.operator.gateway_status import GatewayStatus
from ndif_operator.operator.kube import KubeApi, KubeError
from ndif_operator.operator.loop import PassOutcome, PlannerLoop, Wake
from ndif_operator.operator.ray_service import (
    application_statuses,
    kuberay_failure,
    model_app_status,
    serve_update_failure,
    upgrade_in_progress,
)
from ndif_operator.operator.recorder import EventRecorder
from ndif_operator.operator.serve_config_patch import PatchResult, ServeConfigPatcher
from ndif_operator.operator.settings import OperatorSettings
from ndif_operator.operator.status import Observation
from ndif_operator.operator.status_writer import StatusWriter
from ndif_operator.planning import Decision
from ndif_operator.scheduling import Schedule
from ndif_operator.scheduling.model_status import model_schedule

logger = logging.getLogger("ndif_operator.reconciler")

Clock = Callable[[], datetime]
Target = tuple[str, str]
_GPU_WAIT_POLL_S = 5.0  # while a Hot model deploys: how often its replica's GPU wait is looked at again

__all__ = ["Clock", "Estimator", "Reconciler"]


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _observation(entry: Entry, schedule: Schedule | None, conflicts: dict[str, str], calendars: str,
                 now: datetime) -> Observation:
    desired = Level(entry.md.spec.level) if entry.md is not None else None
    if entry.activated:
        desired = Level.HOT
    was_scheduled = any(c.get("type") == "Scheduled" for c in entry.status.get("conditions") or [])
    shown, scheduled = model_schedule(entry.key, schedule, now, schedule_name=calendars,
                                      conflict=conflicts.get(entry.key, ""), was_scheduled=was_scheduled)
    if schedule is not None and schedule.current(entry.key, now) is not None and entry.md is not None:
        desired = Level.HOT  # booked: planned dedicated Hot whatever the spec says
    return Observation(generation=entry.generation, desired_level=desired, invalid=entry.invalid,
                       estimate=entry.estimate, estimate_reason=entry.estimate_reason,
                       estimate_message=entry.estimate_message, deleting=entry.deleting,
                       activated_until=entry.activated_until, activated=entry.activated, schedule=shown,
                       scheduled=scheduled)


class Reconciler:
    def __init__(self, api: KubeApi, settings: OperatorSettings, *, estimator: Estimator | None = None,
                 clock: Clock = _utcnow, gateway: GatewayStatus | None = None) -> None:
        self.api = api
        self.settings = settings
        self._clock = clock
        self.cache_store = CacheStore(api, settings.operator_namespace, settings.cache_config_map)
        self.recorder = EventRecorder(api, clock)
        self.estimations = Estimations(api, settings, self.cache_store, estimator)
        self.gateway = gateway or GatewayStatus(settings.gateway_url, settings.gateway_api_key)
        self.activations = Activations(settings, self.gateway, self.recorder, clock)
        self.patcher = ServeConfigPatcher(api, settings.render_options(), self.recorder)
        self.writer = StatusWriter(api, settings.finalizer, self.recorder)
        self.calendars = Calendars(api, settings.operator_namespace, settings.ray_service)
        self.loop = PlannerLoop(settings, self.reconcile_once)
        self.loop.timers.set_check(Wake.DEMAND_POLL, self.activations.check)
        self.loop.timers.set_check(Wake.CALENDAR_POLL, lambda: self.calendars.poll(self._clock()))

    @property
    def passes(self) -> int:
        return self.loop.passes

    def wake(self) -> None:
        self.loop.wake()

    def _cache_changed(self) -> None:
        self.estimations.cache_changed()
        self.wake()

    async def run(self) -> None:
        """Plan forever (until cancelled), watching the evaluator cache ConfigMap, the calendars and
        the gateways' pushed activation demand alongside."""
        watchers = [asyncio.create_task(self.cache_store.watch(self._cache_changed), name="ndif-cache-watch"),
                    asyncio.create_task(self.calendars.watch(self.wake), name="ndif-calendar-watch"),
                    asyncio.create_task(self.activations.watch(self.wake), name="ndif-demand-watch")]
        try:
            await self.loop.run()
        finally:
            for watcher in watchers:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher

    async def reconcile_once(self) -> PassOutcome:
        now = self._clock()
        if not self.cache_store.loaded:
            await self.cache_store.load()  # before any evaluation: a restart re-reads no checkpoint
        objects = await self.api.list_model_deployments(self.settings.namespace_list)
        metrics.keep_deployments((o["metadata"]["namespace"], o["metadata"]["name"]) for o in objects)
        targets: dict[Target, list[Entry]] = defaultdict(list)
        for obj in objects:
            entry = parse_entry(obj)
            ray_service = (entry.md.spec.ray_service if entry.md is not None else None) or self.settings.ray_service
            targets[(entry.namespace, ray_service)].append(entry)
        self.activations.forget(set(targets))
        nodes = await self.api.list_nodes() if targets and self.settings.read_nodes else []
        outcome = PassOutcome()
        levels: dict[str, int] = dict.fromkeys((level.value for level in Level), 0)
        for target in sorted(targets):
            try:
                granted = await self._reconcile_target(target, targets[target], nodes, now, outcome)
            except KubeError as exc:
                if exc.status == 409:
                    raise
                outcome.retry = True
                outcome.errors.append(f"{target[0]}/{target[1]}: {exc}")
                continue
            for level in granted:
                levels[level] += 1
        for level, count in levels.items():
            metrics.DEPLOYMENTS.labels(level).set(count)
        try:
            await self.cache_store.save()
        except KubeError as exc:
            outcome.retry = True  # the entries stay in memory; a later pass writes them
            outcome.errors.append(f"evaluator cache {self.cache_store.where}: {exc}")
        return outcome

    async def _gpu_waits(self, target: Target, observations: dict[str, Observation],
                         outcome: PassOutcome) -> dict[str, Observation]:
        """While a Hot model's application deploys, ask the gateway whether its replica waits for a
        GPU share another model still holds (the wait starts after the config is applied, and can
        last minutes): the Ready condition says so at once, and again every few seconds."""
        deploying = [k for k, o in observations.items() if o.decision is not None and o.decision.level == Level.HOT
                     and o.app is not None and o.app.status != "RUNNING" and not o.app.unschedulable]
        if not deploying:
            return observations
        outcome.want(Wake.GPU_WAIT, _GPU_WAIT_POLL_S)
        waits = await self.gateway.gpu_waits(*target)
        return {k: replace(o, gpu_wait=waits.get(k)) if k in deploying else o for k, o in observations.items()}

    async def _reconcile_target(self, target: Target, entries: list[Entry], nodes: list[dict[str, Any]],
                                now: datetime, outcome: PassOutcome) -> list[str]:
        namespace, name = target
        reject_duplicates(entries)
        live = [e for e in entries if e.md is not None and e.invalid is None and not e.deleting]

        await for_each(live, lambda e: self.estimations.size(e, outcome))
        await self.activations.apply(target, live, now, outcome)
        schedule = await self.calendars.schedule_for(target, live, now)
        ray_service = await self.api.get_ray_service(namespace, name)
        release_deleted = False  # whether deleted entries may drop their finalizer this pass
        decisions: dict[str, Decision] = {}
        conflicts: dict[str, str] = {}
        patched: PatchResult | None = None
        if ray_service is not None and not upgrade_in_progress(ray_service):
            patched = await self.patcher.plan_and_patch(target, ray_service, live, nodes, now, schedule)
            decisions = patched.decisions
            conflicts = await self.calendars.finish(target, decisions, now, outcome)
        else:
            self.calendars.want_timers(target, now, outcome)
        base = {e.key: _observation(e, schedule, conflicts, self.calendars.describe(e.key), now) for e in entries}
        if ray_service is None:
            missing = f"RayService {namespace}/{name} not found; waiting for it to be created"
            observations = {k: replace(o, ray_service_missing=missing) for k, o in base.items()}
            release_deleted = True  # nothing to remove a model from
        elif upgrade_in_progress(ray_service):
            apps = application_statuses(ray_service)
            frozen = "RayService upgrade in progress (pending cluster): placement frozen until it completes"
            observations = {e.key: replace(base[e.key], frozen=frozen,
                                           app=model_app_status(apps, e.namespace, e.name)) for e in entries}
        else:
            assert patched is not None
            selector = f"involvedObject.kind=RayService,involvedObject.name={name}"
            events = await self.api.list_events(namespace, selector)
            failure = kuberay_failure(ray_service) or patched.error or serve_update_failure(events)
            apps = application_statuses(ray_service)
            observations = {e.key: replace(base[e.key], decision=decisions.get(e.key), ray_service_error=failure,
                                           app=model_app_status(apps, e.namespace, e.name)) for e in entries}
            observations = await self._gpu_waits(target, observations, outcome)
            if patched.error is None:
                release_deleted = True
            else:
                outcome.retry = True
                outcome.errors.append(patched.error)
        granted: list[str] = []

        async def finish(entry: Entry) -> None:
            if entry.deleting and release_deleted:
                await self.writer.release(entry, outcome)
                return
            new_status = await self.writer.write_status(entry, observations[entry.key], now)
            if new_status.get("level"):
                granted.append(str(new_status["level"]))
            # Finalizer and assignments in one write. A model deleted before its first finalizer lands
            # still leaves the config on the next pass: planning is level-triggered.
            await self.writer.ensure_metadata(entry, decisions.get(entry.key), outcome)

        await for_each(entries, finish)
        return granted

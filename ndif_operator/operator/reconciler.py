"""The one planner loop: every ModelDeployment → plan → one serveConfigV2 per RayService → statuses.

Kopf handlers only `wake()` it. A pass waits until events stop arriving for `debounce_seconds`
(at most 8x that), so a burst of 200 applies becomes a handful of passes; it also runs every
`resync_seconds` (level-triggered: a lost event costs latency, never correctness). Per RayService it
reads the inventory, sizes and plans every live model, renders, validates and merge-patches
`spec.serveConfigV2` only when the string differs, then writes each status only if it changed,
posts Events for condition transitions, and releases the finalizer of deleted models whose app is
gone from the patched config. API errors never escape: a pass that fails is retried with capped
exponential backoff (a 409 at once), and the failure is written into the affected statuses.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from ndif_operator.api import Estimate, Level, ModelDeployment, ModelSpec, Reason, RuntimeLimits
from ndif_operator.api.naming import model_app_name, model_key
from ndif_operator.evaluation import (
    EstimateError,
    EstimatePending,
    entry_from_runtime_output,
    estimate,
    estimate_from_entry,
)
from ndif_operator.operator import health, metrics
from ndif_operator.operator.cache_store import CacheStore
from ndif_operator.operator.events import event_body
from ndif_operator.operator.gateway_status import GatewayStatus
from ndif_operator.operator.inventory import read_inventory
from ndif_operator.operator.kube import KubeApi, KubeError
from ndif_operator.operator.meta_job import JOB_LABEL, JobOutcome, job_manifest, job_name, job_outcome
from ndif_operator.operator.ray_service import (
    application_statuses,
    kuberay_failure,
    serve_update_failure,
    upgrade_in_progress,
)
from ndif_operator.operator.ray_service import (
    serve_config_text as current_serve_config,
)
from ndif_operator.operator.requests import (
    ASSIGNMENTS_ANNOTATION,
    current_placement,
    encode_assignments,
    placement_request,
)
from ndif_operator.operator.settings import OperatorSettings
from ndif_operator.operator.status import Observation, compute_status, status_changed, transitions
from ndif_operator.planning import Decision, Plan, plan
from ndif_operator.planning.activation import activation_until, is_active
from ndif_operator.rendering import (
    ServeConfigInvalid,
    check_serve_config,
    render_serve_config,
    serve_config_text,
)

logger = logging.getLogger("ndif_operator.reconciler")

Estimator = Callable[[ModelSpec, RuntimeLimits], Estimate]
Clock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@dataclass
class _Entry:
    """One ModelDeployment in one pass."""

    obj: dict[str, Any]
    namespace: str
    name: str
    md: ModelDeployment | None
    invalid: str | None
    deleting: bool
    estimate: Estimate | None = None
    estimate_reason: Reason | None = None
    estimate_message: str = ""
    activated_until: datetime | None = None
    activated: bool = False  # Hot on request in this pass

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def generation(self) -> int:
        return int(self.obj["metadata"].get("generation") or 1)

    @property
    def status(self) -> dict[str, Any]:
        return dict(self.obj.get("status") or {})


@dataclass
class _Outcome:
    retry: bool = False
    errors: list[str] = field(default_factory=list)


def _parse(obj: dict[str, Any]) -> tuple[ModelDeployment | None, str | None]:
    try:
        return ModelDeployment.model_validate(obj), None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        return None, f"{where}: {first['msg']}{more}"


class Reconciler:
    def __init__(self, api: KubeApi, settings: OperatorSettings, *, estimator: Estimator | None = None,
                 clock: Clock = _utcnow) -> None:
        self.api = api
        self.settings = settings
        self.cache_store = CacheStore(api, settings.operator_namespace, settings.cache_config_map)
        cache = self.cache_store.cache
        self._estimator: Estimator = estimator or (lambda model, limits: estimate(model, limits, cache))
        self._clock = clock
        self._wake = asyncio.Event()
        self._memo: dict[str, Estimate | tuple[Reason, str]] = {}
        self._pending: dict[str, str] = {}  # fingerprint → cache key sized by a meta-device Job
        self._pending_seen = False
        self._written: dict[tuple[str, str], str] = {}
        self._gateway = GatewayStatus(settings.gateway_url, settings.gateway_api_key)
        self.passes = 0
        self.options = settings.render_options()

    def wake(self) -> None:
        self._wake.set()

    async def _quiet(self) -> None:
        """Wait for a wake-up (or the resync), then until events pause for `debounce_seconds`."""
        try:
            await asyncio.wait_for(self._wake.wait(), self.settings.resync_seconds)
        except TimeoutError:
            pass
        debounce = self.settings.debounce_seconds
        waited = 0.0
        while debounce > 0:
            self._wake.clear()
            await asyncio.sleep(debounce)
            waited += debounce
            if not self._wake.is_set() or waited >= 8 * debounce:
                break
        self._wake.clear()

    async def run(self) -> None:
        """Plan forever (until cancelled). Never raises on API trouble: it backs off and retries."""
        backoff = self.settings.backoff_initial_seconds
        loop = asyncio.get_running_loop()
        while True:
            await self._quiet()
            started = loop.time()
            try:
                outcome = await self.reconcile_once()
            except KubeError as exc:
                outcome = _Outcome(retry=True, errors=[str(exc)])
                if exc.status == 409:
                    backoff = min(backoff, 0.05)  # somebody wrote first: re-read and go again at once
            except Exception:
                logger.exception("planner pass failed")
                outcome = _Outcome(retry=True, errors=["unexpected error"])
            metrics.RECONCILE_SECONDS.observe(loop.time() - started)
            metrics.RECONCILES.labels("retry" if outcome.retry else "ok").inc()
            health.STATE.pass_finished(ok=not outcome.retry, error="; ".join(outcome.errors))
            if outcome.retry:
                logger.warning("planner pass incomplete (%s); retrying in %.2fs", "; ".join(outcome.errors), backoff)
                loop.call_later(backoff, self.wake)
                backoff = min(max(backoff, self.settings.backoff_initial_seconds) * 2,
                              self.settings.backoff_max_seconds)
            else:
                backoff = self.settings.backoff_initial_seconds

    # --- one pass -------------------------------------------------------------------------------

    async def reconcile_once(self) -> _Outcome:
        self.passes += 1
        now = self._clock()
        self._pending_seen = False
        if not self.cache_store.loaded:
            await self.cache_store.load()  # before any evaluation: a restart re-reads no checkpoint
        objects = await self.api.list_model_deployments(self.settings.namespace_list)
        targets: dict[tuple[str, str], list[_Entry]] = defaultdict(list)
        for obj in objects:
            meta = obj["metadata"]
            md, invalid = _parse(obj)
            entry = _Entry(obj=obj, namespace=meta["namespace"], name=meta["name"], md=md, invalid=invalid,
                           deleting=bool(meta.get("deletionTimestamp")))
            ray_service = (md.spec.ray_service if md is not None else None) or self.settings.ray_service
            targets[(entry.namespace, ray_service)].append(entry)
        nodes = await self.api.list_nodes() if targets and self.settings.read_nodes else []
        outcome = _Outcome()
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
        if self._pending_seen:
            # Job completions are not watched (no RBAC to watch Jobs): poll while any runs.
            asyncio.get_running_loop().call_later(self.settings.pending_poll_seconds, self.wake)
        try:
            await self.cache_store.save()
        except KubeError as exc:
            outcome.retry = True  # the entries stay in memory; a later pass writes them
            outcome.errors.append(f"evaluator cache {self.cache_store.where}: {exc}")
        return outcome

    async def _estimate(self, entry: _Entry) -> None:
        assert entry.md is not None
        status = entry.status
        if status.get("estimate") and status.get("observedGeneration") == entry.generation:
            try:
                entry.estimate = Estimate.model_validate(status["estimate"])
                return  # sized already for this generation (e.g. before an operator restart)
            except ValidationError:
                pass
        spec = entry.md.spec
        fingerprint = json.dumps([spec.model.model_dump(mode="json"), spec.limits.model_dump(mode="json")],
                                 sort_keys=True)
        known = self._memo.get(fingerprint)
        if known is None:
            pending_key = self._pending.get(fingerprint)
            if pending_key is not None:
                known = await self._meta_evaluation(entry, spec.model, pending_key)
                if known is None:
                    return  # still pending: the message is on the entry
            else:
                known = await self._run_estimator(entry, fingerprint)
                if known is None:
                    return
            if isinstance(known, Estimate):
                self._pending.pop(fingerprint, None)  # the meta-device Job (if any) is done
            if isinstance(known, Estimate) or fingerprint not in self._pending:
                self._memo[fingerprint] = known
        if isinstance(known, Estimate):
            entry.estimate = known
        else:
            entry.estimate_reason, entry.estimate_message = known

    async def _run_estimator(self, entry: _Entry, fingerprint: str) -> Estimate | tuple[Reason, str] | None:
        """The evaluator in a thread; None when it needs the runtime-side meta-device evaluator."""
        assert entry.md is not None
        spec = entry.md.spec
        try:
            return await asyncio.to_thread(self._estimator, spec.model, spec.limits)
        except EstimatePending as exc:
            self._pending[fingerprint] = exc.cache_key
            return await self._meta_evaluation(entry, spec.model, exc.cache_key)
        except EstimateError as exc:
            return (Reason.ESTIMATE_FAILED, str(exc) or type(exc).__name__)
        except Exception as exc:
            logger.exception("estimating %s failed", entry.key)
            return (Reason.ESTIMATE_FAILED, f"{type(exc).__name__}: {exc}")

    async def _meta_evaluation(self, entry: _Entry, model: ModelSpec,
                               key: str) -> Estimate | tuple[Reason, str] | None:
        """Start, or read, the meta-device evaluator Job of `key` (see meta_job.py).

        Returns the estimate once the Job's entry is in the cache, a failure, or None while it runs
        (with EstimatePending and a message set on `entry`; the loop polls again soon).
        """
        assert entry.md is not None
        namespace, name = self.settings.operator_namespace, job_name(key)
        where = f"Job {namespace}/{name}"
        try:
            job = await self.api.get_job(namespace, name)
            if job is None:
                manifest = job_manifest(model, key, namespace=namespace, image=self.settings.runtime_image,
                                        service_account=self.settings.meta_evaluator_service_account)
                try:
                    await self.api.create_job(namespace, manifest)
                    logger.info("started the meta-device evaluator %s for %s", where, key)
                except KubeError as exc:
                    if exc.status != 409:
                        raise  # 409: started by an earlier pass or operator, which is what we want
                outcome = JobOutcome(done=False)
            else:
                pods = await self.api.list_pods(namespace, f"{JOB_LABEL}={name}")
                outcome = job_outcome(job, pods)
        except KubeError as exc:
            self._pending_seen = True
            entry.estimate_reason = Reason.ESTIMATE_PENDING
            entry.estimate_message = f"no safetensors files; cannot run the meta-device evaluator {where}: {exc}"
            return None
        if not outcome.done:
            self._pending_seen = True
            entry.estimate_reason = Reason.ESTIMATE_PENDING
            entry.estimate_message = ("no safetensors files; sizing the checkpoint on the meta device in "
                                      f"{where} ({self.settings.runtime_image})")
            return None
        if outcome.failure:
            return (Reason.ESTIMATE_FAILED, f"{outcome.failure} (delete the Job to retry)")
        try:
            result = entry_from_runtime_output(outcome.output)
        except ValueError as exc:
            return (Reason.ESTIMATE_FAILED, f"{where}: {exc} (delete the Job to retry)")
        if result.key != key:
            return (Reason.ESTIMATE_FAILED, f"{where} sized {result.key!r}, not {key!r}")
        self.cache_store.cache.put(result)  # persisted by this pass's cache save
        return estimate_from_entry(result, entry.md.spec.limits)

    @staticmethod
    def _reject_duplicates(entries: list[_Entry]) -> None:
        """Two live deployments of one repo id in one RayService: the oldest serves, the rest are invalid."""
        owners: dict[str, _Entry] = {}
        live = [e for e in entries if e.md is not None and not e.deleting]
        for entry in sorted(live, key=lambda e: (str(e.obj["metadata"].get("creationTimestamp") or ""), e.key)):
            assert entry.md is not None
            key = model_key(entry.md.spec.model.repo_id)
            if key in owners:
                entry.invalid = f"model {key!r} is already served by {owners[key].key} in this RayService"
            else:
                owners[key] = entry

    async def _reconcile_target(self, target: tuple[str, str], entries: list[_Entry], nodes: list[dict[str, Any]],
                                now: datetime, outcome: _Outcome) -> list[str]:
        namespace, name = target
        self._reject_duplicates(entries)
        live = [e for e in entries if e.md is not None and e.invalid is None and not e.deleting]

        await self._each(live, self._estimate)
        await self._activations(target, live, now)
        ray_service = await self.api.get_ray_service(namespace, name)
        observations: dict[str, Observation] = {}
        release_deleted = False  # whether deleted entries may drop their finalizer this pass
        decisions: dict[str, Decision] = {}
        base = {e.key: self._observation(e) for e in entries}
        if ray_service is None:
            missing = f"RayService {namespace}/{name} not found; waiting for it to be created"
            observations = {k: replace(o, ray_service_missing=missing) for k, o in base.items()}
            release_deleted = True  # nothing to remove a model from
        elif upgrade_in_progress(ray_service):
            apps = application_statuses(ray_service)
            frozen = "RayService upgrade in progress (pending cluster): placement frozen until it completes"
            observations = {e.key: replace(base[e.key], frozen=frozen,
                                            app=apps.get(model_app_name(e.namespace, e.name))) for e in entries}
        else:
            decisions, patch_error = await self._plan_and_patch(target, ray_service, live, nodes, now)
            selector = f"involvedObject.kind=RayService,involvedObject.name={name}"
            events = await self.api.list_events(namespace, selector)
            failure = kuberay_failure(ray_service) or patch_error or serve_update_failure(events)
            apps = application_statuses(ray_service)
            observations = {e.key: replace(base[e.key], decision=decisions.get(e.key), ray_service_error=failure,
                                            app=apps.get(model_app_name(e.namespace, e.name))) for e in entries}
            if patch_error is None:
                release_deleted = True
            else:
                outcome.retry = True
                outcome.errors.append(patch_error)
        granted: list[str] = []

        async def finish(entry: _Entry) -> None:
            if entry.deleting and release_deleted:
                await self._release(entry)
                return
            new_status = await self._write_status(entry, observations[entry.key], now)
            if new_status.get("level"):
                granted.append(str(new_status["level"]))
            # Finalizer and assignments in one write. A model deleted before its first finalizer lands
            # still leaves the config on the next pass: planning is level-triggered.
            await self._ensure_metadata(entry, decisions.get(entry.key))

        await self._each(entries, finish)
        return granted

    @staticmethod
    async def _each(entries: list[_Entry], work: Callable[[_Entry], Awaitable[None]], limit: int = 8) -> None:
        """Run `work` per object with bounded concurrency; the first error wins after all finish."""
        gate = asyncio.Semaphore(limit)

        async def bounded(entry: _Entry) -> None:
            async with gate:
                await work(entry)

        results = await asyncio.gather(*(bounded(e) for e in entries), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _observation(self, entry: _Entry) -> Observation:
        desired = Level(entry.md.spec.level) if entry.md is not None else None
        if entry.activated:
            desired = Level.HOT
        return Observation(generation=entry.generation, desired_level=desired, invalid=entry.invalid,
                           estimate=entry.estimate, estimate_reason=entry.estimate_reason,
                           estimate_message=entry.estimate_message, deleting=entry.deleting,
                           activated_until=entry.activated_until, activated=entry.activated)

    async def _activations(self, target: tuple[str, str], live: list[_Entry], now: datetime) -> None:
        """activateOnRequest: read the gateway's demand and set each Warm model's Hot window."""
        candidates = [e for e in live if e.md is not None and e.md.spec.activate_on_request
                      and Level(e.md.spec.level) == Level.WARM]
        if not candidates:
            return  # a policy or level change ends any activation: status drops activatedUntil
        demands = await self._gateway.demands(*target)
        wake_in = self.settings.activation_poll_seconds
        for entry in candidates:
            assert entry.md is not None
            previous = _parse_time(entry.status.get("activatedUntil"))
            until = activation_until(
                activate_on_request=True, spec_level=Level(entry.md.spec.level), demand=demands.get(entry.key),
                current_until=previous, now=now, minimum_deployment_seconds=entry.md.spec.minimum_deployment_seconds,
                ttl_seconds=self.settings.activation_ttl_seconds)
            entry.activated_until = until
            entry.activated = is_active(until, now)
            if entry.activated and until != previous:
                await self._event(entry.obj, "ActivatedOnRequest", f"requested while Warm: Hot until "
                                  f"{until.isoformat() if until else ''} (activateOnRequest)", warning=False)
            elif not entry.activated and previous is not None and entry.status.get("level") == Level.HOT.value:
                await self._event(entry.obj, "ActivationExpired", "no longer Hot on request: back to Warm",
                                  warning=False)
            if entry.activated and until is not None:
                wake_in = min(wake_in, max((until - now).total_seconds(), 0.0) + 0.05)
        asyncio.get_running_loop().call_later(wake_in, self.wake)  # poll for demand, and expire on time

    async def _plan_and_patch(self, target: tuple[str, str], ray_service: dict[str, Any], live: list[_Entry],
                              nodes: list[dict[str, Any]], now: datetime) -> tuple[dict[str, Decision], str | None]:
        namespace, name = target
        reading = read_inventory(ray_service, nodes)
        for warning in reading.warnings:
            logger.warning("RayService %s/%s: %s", namespace, name, warning)
        deployments = {e.key: _effective(e) for e in live if e.md is not None}
        requests = []
        for entry in live:
            annotations = entry.obj["metadata"].get("annotations") or {}
            current = current_placement(entry.status, annotations)
            requests.append(placement_request(entry.key, deployments[entry.key], entry.estimate, current))
        try:
            with metrics.PLAN_SECONDS.time():
                result: Plan = plan(reading.inventory, requests, now=now)
        except ValueError as exc:
            # Bad input the CRD cannot rule out (e.g. an inventory the planner refuses): report, keep config.
            logger.error("planning %s/%s failed: %s", namespace, name, exc)
            return {}, f"planning failed, serve config unchanged: {exc}"
        label = f"{namespace}/{name}"
        metrics.GPUS_AVAILABLE.labels(label).set(result.gpus_total)
        metrics.GPUS_PLANNED.labels(label).set(result.gpus_used)
        estimates = {e.key: e.estimate for e in live if e.estimate is not None}
        config = render_serve_config(result, deployments, options=self.options, estimates=estimates)
        try:
            check_serve_config(config)
        except ServeConfigInvalid as exc:
            # A renderer bug must never reach KubeRay (it does not validate serveConfigV2 itself).
            logger.error("refusing to patch %s: %s", label, exc)
            return result.by_key, f"rendered Serve config is invalid, not applied: {exc}"
        text = serve_config_text(config)
        on_cluster = current_serve_config(ray_service)
        if text == on_cluster:
            self._written[target] = text
            return result.by_key, None
        if target in self._written and on_cluster != self._written[target]:
            await self._event(ray_service, "ServeConfigOverwritten", "serveConfigV2 was changed outside "
                              "ndif-operator; restoring the planned config", warning=True)
        try:
            await self.api.patch_serve_config(namespace, name, text)
        except KubeError as exc:
            metrics.PATCHES.labels("error").inc()
            return result.by_key, f"cannot update RayService {label}: {exc}; retrying"
        metrics.PATCHES.labels("ok").inc()
        self._written[target] = text
        logger.info("patched serveConfigV2 of %s (%d applications)", label, len(config["applications"]))
        return result.by_key, None

    async def _write_status(self, entry: _Entry, obs: Observation, now: datetime) -> dict[str, Any]:
        old = entry.status
        new = compute_status(obs, old, now)
        if not status_changed(old, new):
            return new
        try:
            written = await self.api.patch_status(entry.namespace, entry.name, new)
        except KubeError as exc:
            if exc.status == 404:
                return new  # deleted meanwhile
            raise
        entry.obj["metadata"]["resourceVersion"] = written["metadata"]["resourceVersion"]
        metrics.STATUS_WRITES.inc()
        for change in transitions(old, new):
            await self._event(entry.obj, f"{change.condition}{change.reason}" if change.condition != "Placed"
                              else change.reason, f"{change.condition}={change.status}: {change.message}".rstrip(": "),
                              warning=change.warning)
        return new

    async def _ensure_metadata(self, entry: _Entry, decision: Decision | None) -> None:
        meta = entry.obj["metadata"]
        if entry.deleting:
            return
        patch: dict[str, Any] = {}
        finalizers = list(meta.get("finalizers") or [])
        if self.settings.finalizer not in finalizers:
            patch["finalizers"] = [*finalizers, self.settings.finalizer]
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
            self.wake()  # stale read: the next pass sees the new object
            return
        entry.obj["metadata"] = written["metadata"]

    async def _release(self, entry: _Entry) -> None:
        meta = entry.obj["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if self.settings.finalizer not in finalizers:
            return
        remaining = [f for f in finalizers if f != self.settings.finalizer]
        try:
            await self.api.patch_metadata(entry.namespace, entry.name,
                                          {"finalizers": remaining or None, "resourceVersion": meta["resourceVersion"]})
        except KubeError as exc:
            if exc.status not in (404, 409):
                raise
            self.wake()
            return
        await self._event(entry.obj, "Released", "the model's Serve application is removed; finalizer released",
                          warning=False)

    async def _event(self, obj: dict[str, Any], reason: str, message: str, *, warning: bool) -> None:
        namespace = obj["metadata"].get("namespace") or "default"
        try:
            await self.api.post_event(namespace, event_body(obj, reason=reason, message=message, warning=warning,
                                                            now=self._clock()))
        except KubeError as exc:
            logger.info("could not post event %s: %s", reason, exc)  # events are best effort


def _effective(entry: _Entry) -> ModelDeployment:
    """The deployment as planned: a model activated on request is asked for Hot."""
    assert entry.md is not None
    if not entry.activated:
        return entry.md
    return entry.md.model_copy(update={"spec": entry.md.spec.model_copy(update={"level": Level.HOT})})


def _parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None

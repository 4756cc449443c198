"""Size estimates for the planner: the evaluator, its failures and retries, meta-device Jobs.

Per (model source, limits) fingerprint an estimate is worked out once and remembered. A failure is
remembered too, but only until its retry time (capped exponential backoff from
`estimate_retry_initial_seconds` to `estimate_retry_max_seconds`); it is retried at once when a
ModelDeployment with that fingerprint changes generation (a spec edit) and when the evaluator cache
ConfigMap changes (`cache_changed`). A checkpoint without safetensors is sized by a meta-device
Job (meta_job.py), polled while it runs. Credentials for header reads come from the Secret the
source names (`tokenSecret`, `credentialsSecret`) in the operator's namespace, where the Job
reads them too.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import ValidationError

from ndif_operator.api import Estimate, ModelSpec, Reason, RuntimeLimits
from ndif_operator.evaluation import (
    EstimateError,
    EstimatePending,
    SourceCredentials,
    entry_from_runtime_output,
    estimate,
    estimate_from_entry,
)
from ndif_operator.operator.cache_store import CacheStore
from ndif_operator.operator.entries import Entry
from ndif_operator.operator.kube import KubeApi, KubeError
from ndif_operator.operator.loop import PassOutcome, Wake
from ndif_operator.operator.meta_job import JOB_LABEL, JobOutcome, job_manifest, job_name, job_outcome
from ndif_operator.operator.settings import OperatorSettings

logger = logging.getLogger("ndif_operator.estimation")

Estimator = Callable[[ModelSpec, RuntimeLimits, SourceCredentials], Estimate]
Failure = tuple[Reason, str]


def default_estimator(cache_store: CacheStore) -> Estimator:
    """The real evaluator, reading and filling the cache the operator persists."""
    cache = cache_store.cache

    def run(model: ModelSpec, limits: RuntimeLimits, credentials: SourceCredentials) -> Estimate:
        return estimate(model, limits, cache, credentials=credentials)

    return run


@dataclass
class _FailedEstimate:
    failure: Failure
    attempts: int
    retry_at: float  # loop time
    seen: set[tuple[str, int]] = field(default_factory=set)  # (object, generation) that saw this failure


def fingerprint(spec_model: ModelSpec, limits: RuntimeLimits) -> str:
    return json.dumps([spec_model.model_dump(mode="json"), limits.model_dump(mode="json")], sort_keys=True)


class Estimations:
    def __init__(self, api: KubeApi, settings: OperatorSettings, cache_store: CacheStore,
                 estimator: Estimator | None = None, *, monotonic: Callable[[], float] | None = None) -> None:
        self.api = api
        self._monotonic = monotonic or (lambda: asyncio.get_running_loop().time())
        self.settings = settings
        self.cache_store = cache_store
        self._estimator = estimator or default_estimator(cache_store)
        self._known: dict[str, Estimate] = {}
        self._failed: dict[str, _FailedEstimate] = {}
        self._pending: dict[str, str] = {}  # fingerprint → cache key sized by a meta-device Job
        self.attempts = 0  # evaluator runs (tests read it)

    def cache_changed(self) -> None:
        """The cache ConfigMap changed: every failed estimate is retried on the next pass."""
        self._failed.clear()

    async def size(self, entry: Entry, outcome: PassOutcome) -> None:
        """Set `entry.estimate`, or `estimate_reason`/`estimate_message` when there is none (yet)."""
        assert entry.md is not None
        status = entry.status
        if status.get("estimate") and status.get("observedGeneration") == entry.generation:
            try:
                entry.estimate = Estimate.model_validate(status["estimate"])
                return  # sized already for this generation (e.g. before an operator restart)
            except ValidationError:
                pass
        spec = entry.md.spec
        key = fingerprint(spec.model, spec.limits)
        known = self._known.get(key)
        if known is not None:
            entry.estimate = known
            return
        now = self._monotonic()
        failed = self._failed.get(key)
        if failed is not None and now < failed.retry_at and (entry.key, entry.generation) in failed.seen:
            entry.estimate_reason, entry.estimate_message = failed.failure
            outcome.want(Wake.ESTIMATE_RETRY, failed.retry_at - now)
            return
        if key in self._pending:
            result = await self._meta_evaluation(entry, spec.model, self._pending[key], outcome)
        else:
            result = await self._evaluate(entry, key, outcome)
        if result is None:
            return  # a meta-device Job runs: the message is on the entry
        if isinstance(result, Estimate):
            self._pending.pop(key, None)
            self._failed.pop(key, None)
            self._known[key] = result
            entry.estimate = result
            return
        attempts = failed.attempts + 1 if failed is not None else 1
        delay = min(self.settings.estimate_retry_initial_seconds * 2 ** (attempts - 1),
                    self.settings.estimate_retry_max_seconds)
        seen = (failed.seen if failed is not None else set()) | {(entry.key, entry.generation)}
        self._failed[key] = _FailedEstimate(result, attempts, now + delay, seen)
        outcome.want(Wake.ESTIMATE_RETRY, delay)
        entry.estimate_reason, entry.estimate_message = result

    async def _credentials(self, model: ModelSpec) -> SourceCredentials | Failure:
        src = model.source
        name = (src.hugging_face.token_secret if src.hugging_face is not None else None) or (
            src.s3.credentials_secret if src.s3 is not None else None)
        if not name or self.cache_store.cache.get_for(model) is not None:
            return SourceCredentials()  # nothing to read, or sized from the cache without I/O
        namespace = self.settings.operator_namespace
        try:
            data = await self.api.read_secret(namespace, name)
        except KubeError as exc:
            return (Reason.ESTIMATE_FAILED, f"cannot read Secret {namespace}/{name}: {exc}")
        if data is None:
            return (Reason.ESTIMATE_FAILED, f"Secret {namespace}/{name} not found (the model source names it; "
                                            "it must be in the operator's namespace)")
        return SourceCredentials.from_secret(data)

    async def _evaluate(self, entry: Entry, key: str, outcome: PassOutcome) -> Estimate | Failure | None:
        """The evaluator in a thread; None while the runtime-side meta-device evaluator runs."""
        assert entry.md is not None
        spec = entry.md.spec
        credentials = await self._credentials(spec.model)
        if isinstance(credentials, tuple):
            return credentials
        self.attempts += 1
        try:
            return await asyncio.to_thread(self._estimator, spec.model, spec.limits, credentials)
        except EstimatePending as exc:
            self._pending[key] = exc.cache_key
            return await self._meta_evaluation(entry, spec.model, exc.cache_key, outcome)
        except EstimateError as exc:
            return (Reason.ESTIMATE_FAILED, str(exc) or type(exc).__name__)
        except Exception as exc:
            logger.exception("estimating %s failed", entry.key)
            return (Reason.ESTIMATE_FAILED, f"{type(exc).__name__}: {exc}")

    async def _meta_evaluation(self, entry: Entry, model: ModelSpec, key: str,
                               outcome: PassOutcome) -> Estimate | Failure | None:
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
                job_state = JobOutcome(done=False)
            else:
                pods = await self.api.list_pods(namespace, f"{JOB_LABEL}={name}")
                job_state = job_outcome(job, pods)
        except KubeError as exc:
            outcome.want(Wake.JOB_POLL, self.settings.pending_poll_seconds)
            entry.estimate_reason = Reason.ESTIMATE_PENDING
            entry.estimate_message = f"no safetensors files; cannot run the meta-device evaluator {where}: {exc}"
            return None
        if not job_state.done:
            outcome.want(Wake.JOB_POLL, self.settings.pending_poll_seconds)
            entry.estimate_reason = Reason.ESTIMATE_PENDING
            entry.estimate_message = ("no safetensors files; sizing the checkpoint on the meta device in "
                                      f"{where} ({self.settings.runtime_image})")
            return None
        self._pending.pop(self._fingerprint_of(entry), None)  # done: a failure is retried from scratch
        if job_state.failure:
            return (Reason.ESTIMATE_FAILED, f"{job_state.failure} (delete the Job to retry)")
        try:
            result = entry_from_runtime_output(job_state.output)
        except ValueError as exc:
            return (Reason.ESTIMATE_FAILED, f"{where}: {exc} (delete the Job to retry)")
        if result.key != key:
            return (Reason.ESTIMATE_FAILED, f"{where} sized {result.key!r}, not {key!r}")
        self.cache_store.cache.put(result)  # persisted by this pass's cache save
        return estimate_from_entry(result, entry.md.spec.limits)

    @staticmethod
    def _fingerprint_of(entry: Entry) -> str:
        assert entry.md is not None
        return fingerprint(entry.md.spec.model, entry.md.spec.limits)

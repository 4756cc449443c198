"""Estimates with a fake API client: retries with backoff, at once on spec or cache change, Secrets."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fake_kube import FakeKubeApi
from operator_harness import OPERATOR_NAMESPACE, model_deployment

from ndif_operator.api import Estimate, ModelSpec, Reason, RuntimeLimits
from ndif_operator.evaluation import CacheEntry, EstimateCache, EstimateError, SourceCredentials, cache_key
from ndif_operator.operator.cache_store import CacheStore
from ndif_operator.operator.entries import Entry, parse_entry
from ndif_operator.operator.estimation import Estimations
from ndif_operator.operator.loop import PassOutcome, Wake
from ndif_operator.operator.settings import OperatorSettings

SETTINGS = OperatorSettings(estimate_retry_initial_seconds=10, estimate_retry_max_seconds=40)
SIZED = Estimate(weights_bytes=800, total_bytes=1000, method="SafetensorsHeaders")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Evaluator:
    """Fails until `works` is set; records the credentials it was given."""

    def __init__(self) -> None:
        self.works = False
        self.calls: list[SourceCredentials] = []

    def __call__(self, model: ModelSpec, limits: RuntimeLimits, credentials: SourceCredentials) -> Estimate:
        self.calls.append(credentials)
        if not self.works:
            raise EstimateError("cannot read config.json")
        return SIZED


def _setup(api: FakeKubeApi | None = None) -> tuple[FakeKubeApi, Estimations, Evaluator, Clock]:
    api = api or FakeKubeApi()
    evaluator, clock = Evaluator(), Clock()
    store = CacheStore(api, OPERATOR_NAMESPACE, "cache")  # type: ignore[arg-type]
    return api, Estimations(api, SETTINGS, store, evaluator, monotonic=clock), evaluator, clock  # type: ignore[arg-type]


def _entry(api: FakeKubeApi, name: str = "m", **spec: Any) -> Entry:
    key = ("ml", name)
    if key not in api.model_deployments:
        api.add(model_deployment(name, "org/model", **spec))
    return parse_entry(api.model_deployments[key])


async def _size(estimations: Estimations, entry: Entry) -> PassOutcome:
    outcome = PassOutcome()
    await estimations.size(entry, outcome)
    return outcome


async def test_a_failure_is_retried_with_capped_backoff() -> None:
    api, estimations, evaluator, clock = _setup()
    delays = []
    for _ in range(4):
        entry = _entry(api)
        outcome = await _size(estimations, entry)
        assert entry.estimate is None and entry.estimate_reason == Reason.ESTIMATE_FAILED
        assert "cannot read config.json" in entry.estimate_message
        delays.append(outcome.timers[Wake.ESTIMATE_RETRY])
        # Before the retry time, passes reuse the failure without running the evaluator.
        calls = len(evaluator.calls)
        clock.now += delays[-1] / 2
        half = await _size(estimations, _entry(api))
        assert len(evaluator.calls) == calls and half.timers[Wake.ESTIMATE_RETRY] == delays[-1] / 2
        clock.now += delays[-1] / 2
    assert delays == [10, 20, 40, 40]
    evaluator.works = True
    entry = _entry(api)
    outcome = await _size(estimations, entry)
    assert entry.estimate == SIZED and Wake.ESTIMATE_RETRY not in outcome.timers


async def test_a_spec_change_or_a_cache_change_retries_at_once() -> None:
    api, estimations, evaluator, _ = _setup()
    await _size(estimations, _entry(api))
    assert len(evaluator.calls) == 1
    api.edit_spec("ModelDeployment", "ml", "m", replicas=2)  # same model and limits, new generation
    await _size(estimations, _entry(api))
    assert len(evaluator.calls) == 2
    await _size(estimations, _entry(api))
    assert len(evaluator.calls) == 2  # that generation has seen the failure: wait for the backoff
    estimations.cache_changed()
    evaluator.works = True
    entry = _entry(api)
    await _size(estimations, entry)
    assert len(evaluator.calls) == 3 and entry.estimate == SIZED


async def test_credentials_come_from_the_named_secret() -> None:
    api, estimations, evaluator, _ = _setup()
    evaluator.works = True
    api.add_secret(OPERATOR_NAMESPACE, "hf", {"token": "hf_secret"})
    api.add_secret(OPERATOR_NAMESPACE, "s3", {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "shh"})
    hub = _entry(api, "hub", model={"repoId": "org/gated", "source": {"huggingFace": {"tokenSecret": "hf"}}})
    s3 = _entry(api, "s3", model={"repoId": "org/s3", "source": {"s3": {"bucket": "models",
                                                                         "credentialsSecret": "s3"}}})
    await _size(estimations, hub)
    await _size(estimations, s3)
    assert evaluator.calls[0].hf_token == "hf_secret"
    assert evaluator.calls[1].s3_client_kwargs() == {"aws_access_key_id": "AKIA", "aws_secret_access_key": "shh"}
    assert ("read_secret", OPERATOR_NAMESPACE, "hf") in api.calls


async def test_a_missing_secret_is_a_failure_that_names_it() -> None:
    api, estimations, evaluator, _ = _setup()
    entry = _entry(api, model={"repoId": "org/gated", "source": {"huggingFace": {"tokenSecret": "absent"}}})
    await _size(estimations, entry)
    assert entry.estimate_reason == Reason.ESTIMATE_FAILED
    assert f"Secret {OPERATOR_NAMESPACE}/absent not found" in entry.estimate_message
    assert evaluator.calls == []


async def test_a_cached_checkpoint_needs_no_secret() -> None:
    api, estimations, evaluator, _ = _setup()
    evaluator.works = True
    entry = _entry(api, model={"repoId": "org/gated", "source": {"huggingFace": {"tokenSecret": "absent"}}})
    assert entry.md is not None
    estimations.cache_store.cache.put(CacheEntry(key=cache_key(entry.md.spec.model), weights_bytes=800,
                                                 parameter_count=400, method="SafetensorsHeaders",
                                                 evaluated_at=datetime(2026, 1, 1, tzinfo=UTC)))
    await _size(estimations, entry)
    assert entry.estimate == SIZED and not any(c[0] == "read_secret" for c in api.calls)


async def test_the_cache_configmap_changes_are_taken_in() -> None:
    api = FakeKubeApi()
    store = CacheStore(api, OPERATOR_NAMESPACE, "cache")  # type: ignore[arg-type]
    entry = CacheEntry(key="file:/m@main#bfloat16", weights_bytes=8, parameter_count=4, method="SafetensorsHeaders",
                       evaluated_at=datetime(2026, 1, 1, tzinfo=UTC))
    body = {"metadata": {"resourceVersion": "7"}, "data": EstimateCache({entry.key: entry}).to_configmap_data()}
    assert store.apply(body) and store.cache.get(entry.key) == entry and store.loaded
    assert not store.apply(body)  # the same data again (e.g. our own write coming back): no change

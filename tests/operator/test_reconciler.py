"""The planner pass and its writers with a fake API client: whole statuses, written only on change,
serveConfigV2 patched only on change, overwrites told apart from re-creation."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from fake_kube import READS, WRITES, FakeKubeApi
from operator_harness import NAMESPACE, model_deployment, ray_service, size_estimator

from ndif_operator.api import Reason
from ndif_operator.operator.entries import parse_entry
from ndif_operator.operator.loop import PassOutcome, Wake
from ndif_operator.operator.reconciler import Reconciler
from ndif_operator.operator.recorder import EventRecorder
from ndif_operator.operator.serve_config_patch import OVERWRITTEN
from ndif_operator.operator.settings import OperatorSettings
from ndif_operator.operator.status import Observation
from ndif_operator.operator.status_writer import StatusWriter
from ndif_operator.planning.activation import Demand

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SETTINGS = OperatorSettings(metrics_port=0, read_nodes=False)


class NoGateway:
    async def demands(self, namespace: str, ray_service: str) -> dict[str, Demand]:
        return {}


def _reconciler(api: FakeKubeApi) -> Reconciler:
    return Reconciler(api, SETTINGS, estimator=size_estimator, clock=lambda: NOW,  # type: ignore[arg-type]
                      gateway=NoGateway())  # type: ignore[arg-type]


def _cluster(*models: dict[str, Any]) -> FakeKubeApi:
    api = FakeKubeApi()
    api.add(ray_service(groups=(("gpu", 1, 2, "80Gi"),)))
    for model in models:
        api.add(model)
    return api


def _status(api: FakeKubeApi, name: str) -> dict[str, Any]:
    return dict(api.model_deployments[(NAMESPACE, name)].get("status") or {})


def _condition(api: FakeKubeApi, name: str, kind: str) -> dict[str, Any]:
    return next(c for c in _status(api, name)["conditions"] if c["type"] == kind)


async def test_a_second_pass_with_nothing_new_writes_nothing() -> None:
    api = _cluster(model_deployment("a", "org/a-10g"), model_deployment("b", "org/b-20g", level="Warm"))
    reconciler = _reconciler(api)
    outcome = await reconciler.reconcile_once()
    assert not outcome.retry, outcome.errors
    assert api.count("patch_serve_config") == 1 and api.count("replace_status") == 2
    writes = api.count(*WRITES)
    reads = api.count(*READS)
    outcome = await reconciler.reconcile_once()
    assert api.count(*WRITES) == writes, api.calls[-10:]
    # An idle pass reads: the deployments, the RayService and its Events (nodes are off here).
    assert api.count(*READS) - reads == 3
    assert outcome.timers == {}


async def test_a_model_gone_cold_loses_its_placement() -> None:
    api = _cluster(model_deployment("a", "org/a-10g"))
    reconciler = _reconciler(api)
    await reconciler.reconcile_once()
    assert _status(api, "a")["placement"]["gpuFraction"] > 0
    api.edit_spec("ModelDeployment", NAMESPACE, "a", level="Cold")
    await reconciler.reconcile_once()
    status = _status(api, "a")
    assert status["level"] == "Cold" and "placement" not in status
    writes = api.count("replace_status")
    await reconciler.reconcile_once()
    assert api.count("replace_status") == writes


async def test_a_failed_estimate_is_not_reported_as_pending() -> None:
    api = _cluster(model_deployment("x", "org/broken-model"))
    await _reconciler(api).reconcile_once()
    evaluated, placed = _condition(api, "x", "Evaluated"), _condition(api, "x", "Placed")
    assert (evaluated["status"], evaluated["reason"]) == ("False", Reason.ESTIMATE_FAILED.value)
    assert (placed["status"], placed["reason"]) == ("False", Reason.ESTIMATE_FAILED.value)
    assert "waiting" not in placed["message"]
    assert _status(api, "x")["phase"] == "Failed"


async def test_a_foreign_edit_is_restored_with_a_warning_but_a_recreation_is_not_an_overwrite() -> None:
    api = _cluster(model_deployment("a", "org/a-10g"))
    reconciler = _reconciler(api)
    await reconciler.reconcile_once()
    planned = api.ray_services[(NAMESPACE, "ndif")]["spec"]["serveConfigV2"]
    api.ray_services[(NAMESPACE, "ndif")]["spec"]["serveConfigV2"] = ""  # kubectl apply of a sample
    await reconciler.reconcile_once()
    assert api.ray_services[(NAMESPACE, "ndif")]["spec"]["serveConfigV2"] == planned
    assert api.reasons().count(OVERWRITTEN) == 1
    # Delete and create the RayService again (new uid): restored without a false warning.
    del api.ray_services[(NAMESPACE, "ndif")]
    await reconciler.reconcile_once()
    assert _condition(api, "a", "Placed")["reason"] == Reason.RAY_SERVICE_MISSING.value
    api.add(ray_service(groups=(("gpu", 1, 2, "80Gi"),)))
    await reconciler.reconcile_once()
    assert api.ray_services[(NAMESPACE, "ndif")]["spec"]["serveConfigV2"] == planned
    assert api.reasons().count(OVERWRITTEN) == 1


async def test_status_writer_writes_whole_statuses_once_and_posts_transitions() -> None:
    api = _cluster(model_deployment("a", "org/a-10g"))
    writer = StatusWriter(api, "ndif.dev/finalizer", EventRecorder(api, lambda: NOW))  # type: ignore[arg-type]
    entry = parse_entry(copy.deepcopy(api.model_deployments[(NAMESPACE, "a")]))
    failed = Observation(generation=1, estimate_reason=Reason.ESTIMATE_FAILED, estimate_message="no config.json")
    await writer.write_status(entry, failed, NOW)
    await writer.write_status(entry, failed, NOW)
    assert writer.writes == 1 and api.reasons() == ["EvaluatedEstimateFailed", "EstimateFailed"]
    missing = Observation(generation=1, estimate_reason=Reason.ESTIMATE_PENDING,
                          ray_service_missing="RayService ml/ndif not found")
    await writer.write_status(entry, missing, NOW)
    assert writer.writes == 2 and _status(api, "a")["conditions"][0]["reason"] == "EstimatePending"
    assert "estimate" not in _status(api, "a")
    outcome = PassOutcome()
    await writer.ensure_metadata(entry, None, outcome)
    await writer.ensure_metadata(entry, None, outcome)
    assert api.count("patch_metadata") == 1
    assert api.model_deployments[(NAMESPACE, "a")]["metadata"]["finalizers"] == ["ndif.dev/finalizer"]


class Gateway:
    def __init__(self) -> None:
        self.answer: dict[str, Demand] = {}
        self.reads = 0

    async def demands(self, namespace: str, ray_service: str) -> dict[str, Demand]:
        self.reads += 1
        return dict(self.answer)


async def test_demand_polling_reads_only_the_gateway_and_wakes_on_new_demand() -> None:
    api = _cluster(model_deployment("w", "org/w-10g", level="Warm", activateOnRequest=True))
    gateway = Gateway()
    reconciler = Reconciler(api, SETTINGS, estimator=size_estimator, clock=lambda: NOW,  # type: ignore[arg-type]
                            gateway=gateway)  # type: ignore[arg-type]
    outcome = await reconciler.reconcile_once()
    assert set(outcome.timers) == {Wake.DEMAND_POLL}
    calls = len(api.calls)
    assert not await reconciler.activations.check()  # no demand: no pass, no API request
    gateway.answer = {f"{NAMESPACE}/w": Demand(requested=True, at=NOW)}
    assert await reconciler.activations.check()
    assert len(api.calls) == calls and gateway.reads == 3
    outcome = await reconciler.reconcile_once()
    assert _status(api, "w")["level"] == "Hot" and Wake.ACTIVATION_EXPIRY in outcome.timers
    assert not await reconciler.activations.check()  # the demand is served: nothing more to do

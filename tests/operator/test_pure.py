"""The operator's pure parts: quantities, inventory, status, requests, RayService reading. No server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from operator_harness import ray_service

from ndif_operator.api import Estimate, Level, ModelDeployment, RankEstimate, Reason
from ndif_operator.operator.inventory import read_inventory
from ndif_operator.operator.quantity import parse_quantity, quantity_bytes
from ndif_operator.operator.ray_service import (
    application_statuses,
    kuberay_failure,
    upgrade_in_progress,
)
from ndif_operator.operator.requests import (
    ASSIGNMENTS_ANNOTATION,
    current_placement,
    decode_assignments,
    encode_assignments,
    placement_request,
)
from ndif_operator.operator.status import Observation, compute_status, status_changed, transitions
from ndif_operator.planning import Decision, ReplicaPlacement

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("text", "value"), [
    ("80Gi", 80 * 2**30), ("500M", 500 * 10**6), ("1.5Ki", 1536), ("2e3", 2000), ("100m", 0), (4, 4),
])
def test_quantities(text: str | int, value: int) -> None:
    assert quantity_bytes(text) == value


@pytest.mark.parametrize("bad", ["", "12Q", "Gi", "1.2.3", True])
def test_bad_quantities_are_rejected(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_quantity(bad)  # type: ignore[arg-type]


def test_inventory_from_annotations_labels_and_nodes() -> None:
    rs = ray_service(groups=(("a100", 2, 4, "80Gi"), ("cpu", 3, 0, "0")))
    groups = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    # Group "l4": GPU memory from a Node's GFD label matched through the nodeSelector.
    l4 = {"groupName": "l4", "replicas": 1, "template": {"spec": {
        "nodeSelector": {"pool": "l4"},
        "containers": [{"name": "w", "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "32Gi"}}}]}}}
    # Group "blind": GPUs but nothing says how much memory: ignored with a warning.
    blind = {"groupName": "blind", "replicas": 1, "template": {"spec": {
        "nodeSelector": {"pool": "h100"},
        "containers": [{"name": "w", "resources": {"limits": {"nvidia.com/gpu": 2}}}]}}}
    groups += [l4, blind]
    nodes = [{"metadata": {"name": "n1", "labels": {"pool": "l4", "nvidia.com/gpu.memory": "23034"}}}]
    reading = read_inventory(rs, nodes)
    by_name = {g.name: g for g in reading.inventory.groups}
    assert (by_name["a100"].pods, by_name["a100"].gpus_per_pod, by_name["a100"].gpu_memory_bytes) == (2, 4, 80 * 2**30)
    assert by_name["a100"].cpu_memory_bytes == 60 * 2**30  # 64Gi limit minus the 4Gi reserve
    assert by_name["cpu"].gpus_per_pod == 0
    assert by_name["l4"].gpu_memory_bytes == 23034 * 2**20
    assert by_name["blind"].gpus_per_pod == 0 and any("blind" in w for w in reading.warnings)
    assert reading.inventory.total_gpus == 9


def test_inventory_counts_max_replicas_under_autoscaling() -> None:
    rs = ray_service(groups=(("gpu", 1, 8, "80Gi"),))
    rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] = True
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = 4
    assert read_inventory(rs).inventory.groups[0].pods == 4


def test_ray_service_reading() -> None:
    rs = ray_service()
    rs["status"] = {
        "conditions": [{"type": "Ready", "status": "False", "reason": "InitializingTimeout", "message": "too slow"}],
        "activeServiceStatus": {"applicationStatuses": {"md-ml-a": {
            "status": "RUNNING", "serveDeploymentStatuses": {"ModelReplica": {"status": "HEALTHY"}}}}},
        "pendingServiceStatus": {"rayClusterName": "ndif-raycluster-new"},
    }
    assert upgrade_in_progress(rs)
    assert kuberay_failure(rs) == "KubeRay: InitializingTimeout: too slow"
    app = application_statuses(rs)["md-ml-a"]
    assert (app.status, app.healthy_deployments, app.deployments) == ("RUNNING", 1, 1)
    assert not upgrade_in_progress(ray_service())


def _decision(level: Level = Level.HOT, reason: Reason = Reason.PLACED_HOT, moved: bool = False) -> Decision:
    return Decision(key="ml/m", level=level, replicas=2 if level == Level.HOT else 0,
                    gpus_per_replica=0.5 if level == Level.HOT else 0.0, gpu_fraction=0.5,
                    worker_group="gpu", assignments=(ReplicaPlacement(0, (1,), 0.5), ReplicaPlacement(1, (0,), 0.5)),
                    reason=reason, message="2 replicas on gpu", since=NOW - timedelta(hours=1), moved=moved)


ESTIMATE = Estimate(weights_bytes=8 * 2**30, total_bytes=10 * 2**30, method="SafetensorsHeaders")


def test_status_hot_deploying_then_ready_keeps_transition_times() -> None:
    obs = Observation(generation=3, desired_level=Level.HOT, estimate=ESTIMATE, decision=_decision())
    first = compute_status(obs, None, NOW)
    assert first["phase"] == "Deploying" and first["level"] == "Hot" and first["replicas"] == 2
    assert first["estimate"]["total"] == "10 GiB" and first["placement"]["gpusPerReplica"] == 0.5
    conditions = {c["type"]: c for c in first["conditions"]}
    assert conditions["Placed"]["status"] == "True" and conditions["Placed"]["observedGeneration"] == 3
    assert conditions["Ready"]["reason"] == "ApplicationMissing"
    # Unchanged inputs later: identical status, so no write.
    assert not status_changed(first, compute_status(obs, first, NOW + timedelta(minutes=5)))
    from ndif_operator.operator.ray_service import AppStatus

    ready = compute_status(_with(obs, app=AppStatus("RUNNING")), first, NOW + timedelta(minutes=5))
    assert ready["phase"] == "Ready" and ready["readyReplicas"] == 2 and ready["message"] == ""
    before = {c["type"]: c for c in first["conditions"]}
    after = {c["type"]: c for c in ready["conditions"]}
    assert after["Placed"]["lastTransitionTime"] == before["Placed"]["lastTransitionTime"]
    assert after["Ready"]["lastTransitionTime"] != before["Ready"]["lastTransitionTime"]
    changes = transitions(first, ready)
    assert [(t.condition, t.reason, t.warning) for t in changes] == [("Ready", "ApplicationRunning", False)]


def _with(obs: Observation, **changes: object) -> Observation:
    from dataclasses import replace

    return replace(obs, **changes)  # type: ignore[arg-type]


def test_status_evicted_is_a_warning_and_warm() -> None:
    obs = Observation(generation=1, desired_level=Level.HOT, estimate=ESTIMATE,
                      decision=_decision(Level.WARM, Reason.EVICTED))
    status = compute_status(obs, None, NOW)
    assert status["phase"] == "Warm" and status["replicas"] == 0
    placed = next(c for c in status["conditions"] if c["type"] == "Placed")
    assert (placed["status"], placed["reason"]) == ("False", "Evicted")
    assert any(t.reason == "Evicted" and t.warning for t in transitions(None, status))


def test_status_invalid_missing_and_frozen() -> None:
    invalid = compute_status(Observation(generation=1, invalid="spec.replicas: bad"), None, NOW)
    assert invalid["phase"] == "Failed" and invalid["message"] == "spec.replicas: bad"
    missing = compute_status(Observation(generation=1, desired_level=Level.HOT, estimate=ESTIMATE,
                                         ray_service_missing="RayService ml/ndif not found"), None, NOW)
    assert {c["reason"] for c in missing["conditions"]} >= {"RayServiceMissing"}
    placed = compute_status(Observation(generation=1, desired_level=Level.HOT, estimate=ESTIMATE,
                                        decision=_decision()), None, NOW)
    frozen = compute_status(Observation(generation=2, desired_level=Level.HOT, estimate=ESTIMATE,
                                        frozen="upgrade"), placed, NOW)
    assert frozen["level"] == "Hot" and frozen["placement"] == placed["placement"]  # nothing moves
    assert next(c for c in frozen["conditions"] if c["type"] == "Placed")["reason"] == "UpgradeInProgress"


def test_requests_and_assignments_round_trip() -> None:
    decision = _decision()
    text = encode_assignments(decision)
    assert decode_assignments(text) == decision.assignments
    assert decode_assignments("not json") == ()
    status = {"level": "Hot", "placement": {"workerGroup": "gpu", "since": "2026-11-27T11:00:00Z"}}
    current = current_placement(status, {ASSIGNMENTS_ANNOTATION: text})
    assert current is not None and current.replicas == decision.assignments
    assert current.since == NOW - timedelta(hours=1)
    md = ModelDeployment.model_validate({"metadata": {"name": "m", "namespace": "ml"}, "spec": {
        "model": {"repoId": "org/m"}, "replicas": 2, "autoscaling": {"minReplicas": 1, "maxReplicas": 3},
        "priority": 5}})
    request = placement_request("ml/m", md, ESTIMATE, current)
    assert (request.replicas, request.priority, request.total_bytes) == (3, 5, 10 * 2**30)
    # The estimate's per-rank figures reach the planner, which sizes each TP rank's share with them.
    ranked = ESTIMATE.model_copy(update={"ranks": [RankEstimate(tensor_parallel_size=1, bytes=10 * 2**30),
                                                   RankEstimate(tensor_parallel_size=2, bytes=6 * 2**30)]})
    assert placement_request("ml/m", md, ranked, current).rank_bytes == ((1, 10 * 2**30), (2, 6 * 2**30))


def test_kuberay_serve_update_events() -> None:
    from ndif_operator.operator.ray_service import serve_update_failure

    failed = {"reason": "FailedToUpdateServeApplications", "message": "bad import_path",
              "lastTimestamp": "2026-11-27T12:00:05Z"}
    updated = {"reason": "UpdatedServeApplications", "message": "", "lastTimestamp": "2026-11-27T12:00:01Z"}
    assert serve_update_failure([updated, failed]) == "KubeRay: FailedToUpdateServeApplications: bad import_path"
    assert serve_update_failure([failed, {**updated, "lastTimestamp": "2026-11-27T12:01:00Z"}]) is None
    assert serve_update_failure([{"reason": "ServeConfigOverwritten"}]) is None


def test_kube_errors_keep_the_servers_message() -> None:
    from kubernetes_asyncio.client.exceptions import ApiException

    from ndif_operator.operator.kube import api_error

    exc = ApiException(status=422, reason="Unprocessable Entity")
    exc.body = ('{"kind":"Status","status":"Failure","reason":"Invalid","code":422,"message":"ModelDeployment.ndif.dev '
                '\\"m\\" is invalid: status.replicas: Invalid value: -1: should be greater than or equal to 0"}')
    error = api_error(exc)
    assert error.status == 422 and error.reason == "Invalid"
    assert "status.replicas: Invalid value: -1" in str(error) and str(error).startswith("422 Invalid: ")
    bare = api_error(ApiException(status=503, reason="Service Unavailable"))
    assert str(bare) == "503 Service Unavailable"

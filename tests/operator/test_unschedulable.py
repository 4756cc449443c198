"""Replicas Ray cannot schedule, or that wait for a GPU share another model holds, show in the
model's Ready condition with the reason (Ray's own words, or the gateway's reading of Ray)."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from operator_harness import Cluster, FakeGateway, OperatorThread, model_deployment, ray_service, wait_for

from model_runtime.gpu_waits import GpuWait
from ndif_operator.api import Estimate, Level, Reason
from ndif_operator.operator.gateway_status import gpu_waits_from_gateway_status
from ndif_operator.operator.ray_service import application_statuses, model_app_status
from ndif_operator.operator.status import Observation, compute_status
from ndif_operator.planning import Decision, ReplicaPlacement

# Serve 2.60's deployment message for replicas that wait for resources.
SERVE_MESSAGE = ("Deployment 'ModelReplica' in application 'md-ml-m_r1' has 1 replicas that have taken more than "
                 "30s to be scheduled. This may be due to waiting for the cluster to auto-scale or for a runtime "
                 "environment to be installed. Resources required for each replica: {\"ndif_gpu_3\": 0.6}, total "
                 "resources available: {}. Use `ray status` for more details.")


def _app(status: str, message: str = "") -> dict[str, object]:
    return {"status": status, "serveDeploymentStatuses": {
        "ModelReplica": {"status": "HEALTHY" if status == "RUNNING" else "UPDATING", "message": message}}}


def test_a_pending_slot_makes_ready_false_with_rays_reason() -> None:
    ray_service = {"status": {"activeServiceStatus": {"applicationStatuses": {
        "md-ml-m": _app("RUNNING"), "md-ml-m_r1": _app("DEPLOYING", SERVE_MESSAGE),
        "md-ml-m-r1": _app("RUNNING"),  # another ModelDeployment named "m-r1": not a slot of "m"
    }}}}
    apps = application_statuses(ray_service)
    merged = model_app_status(apps, "ml", "m")
    assert merged is not None and merged.status == "DEPLOYING" and merged.deployments == 2
    assert merged.unschedulable.startswith("md-ml-m_r1: Deployment 'ModelReplica'")
    decision = Decision(key="ml/m", level=Level.HOT, replicas=2, gpus_per_replica=0.6, gpu_fraction=0.6,
                        worker_group="gpu",
                        assignments=(ReplicaPlacement(0, (1,), 0.6), ReplicaPlacement(1, (3,), 0.6)),
                        reason=Reason.PLACED_HOT, message="2 replicas on gpu")
    obs = Observation(generation=1, desired_level=Level.HOT, decision=decision, app=merged,
                      estimate=Estimate(weights_bytes=1, total_bytes=2, method="Config"))
    status = compute_status(obs, None, datetime(2026, 12, 7, tzinfo=UTC))
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ReplicasUnschedulable")
    assert "ndif_gpu_3" in ready["message"] and "md-ml-m_r1" in ready["message"]
    assert model_app_status(apps, "ml", "m-r1") == apps["md-ml-m-r1"]
    assert model_app_status(apps, "ml", "absent") is None


def test_a_gpu_lease_that_stays_taken_is_reported_as_unschedulable() -> None:
    """A WARM replica made HOT in place leases its GPU share; when the share stays taken, its
    reconfigure fails and Serve quotes the error in the application's status."""
    from ndif_operator.api.pinning import GPU_LEASE_UNAVAILABLE

    error = (f"The deployment failed to reconfigure. Error:\nTraceback (most recent call last):\n  ...\n"
             f"model_runtime.replica.gpu_lease.GpuLeaseTimeout: {GPU_LEASE_UNAVAILABLE} after 300 s: "
             "{'ndif_gpu_2': 0.5}")
    failed = {"status": "DEPLOY_FAILED", "message": error,
              "serveDeploymentStatuses": {"ModelReplica": {"status": "UNHEALTHY", "message": ""}}}
    apps = application_statuses({"status": {"activeServiceStatus": {"applicationStatuses": {"md-ml-m": failed}}}})
    merged = model_app_status(apps, "ml", "m")
    assert merged is not None and "ndif_gpu_2" in merged.unschedulable
    decision = Decision(key="ml/m", level=Level.HOT, replicas=1, gpus_per_replica=0.5, gpu_fraction=0.5,
                        worker_group="gpu", assignments=(ReplicaPlacement(0, (2,), 0.5),),
                        reason=Reason.PLACED_HOT, message="1 replica on gpu")
    obs = Observation(generation=1, desired_level=Level.HOT, decision=decision, app=merged,
                      estimate=Estimate(weights_bytes=1, total_bytes=2, method="Config"))
    ready = next(c for c in compute_status(obs, None, datetime(2026, 12, 7, tzinfo=UTC))["conditions"]
                 if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ReplicasUnschedulable")
    assert GPU_LEASE_UNAVAILABLE in ready["message"]


WAIT = ("waiting since 2026-12-07T18:00:00Z for GPU 2 (ndif_gpu_2: 0.5) on node 3f2a9c1b0d4e, held by ml/other; "
        "gives up at 2026-12-07T18:05:00Z")


def test_a_replica_waiting_for_a_gpu_share_says_so_and_whose() -> None:
    """While the Hot model's application deploys and its replica waits for the GPU share another
    model holds (the gateway reads it from Ray), Ready says so at once, not "deploying"."""
    decision = Decision(key="ml/m", level=Level.HOT, replicas=1, gpus_per_replica=0.5, gpu_fraction=0.5,
                        worker_group="gpu", assignments=(ReplicaPlacement(0, (2,), 0.5),),
                        reason=Reason.PLACED_HOT, message="1 replica on gpu")
    deploying = application_statuses({"status": {"activeServiceStatus": {"applicationStatuses": {
        "md-ml-m": _app("DEPLOYING")}}}})["md-ml-m"]
    obs = Observation(generation=1, desired_level=Level.HOT, decision=decision, app=deploying, gpu_wait=WAIT,
                      estimate=Estimate(weights_bytes=1, total_bytes=2, method="Config"))
    status = compute_status(obs, None, datetime(2026, 12, 7, tzinfo=UTC))
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "WaitingForGpu")
    assert ready["message"] == f"a replica is {WAIT}"
    assert status["phase"] == "Deploying" and "held by ml/other" in status["message"]
    # Once the application runs, an old word from the gateway does not hide it.
    running = replace(obs, app=application_statuses({"status": {"activeServiceStatus": {"applicationStatuses": {
        "md-ml-m": _app("RUNNING")}}}})["md-ml-m"])
    ready = next(c for c in compute_status(running, None, datetime(2026, 12, 7, tzinfo=UTC))["conditions"]
                 if c["type"] == "Ready")
    assert ready["reason"] == "ApplicationRunning"


def test_gpu_waits_from_gateway_status() -> None:
    body = {"deployments": {
        "md-ml-m": {"deployment": "ml/m", "gpu_wait": {"message": WAIT, "holders": ["ml/other"]}},
        "md-ml-n": {"deployment": "ml/n", "gpu_wait": None},
        "odd": "x", "md-ml-o": {"gpu_wait": {"message": "no deployment"}},
    }}
    assert gpu_waits_from_gateway_status(body) == {"ml/m": WAIT}
    assert gpu_waits_from_gateway_status({"deployments": []}) == {}


def test_the_operator_shows_a_gpu_wait_while_the_app_deploys(cluster: Cluster, gateway: FakeGateway) -> None:
    cluster.emu.create_sync(ray_service())
    cluster.emu.create_sync(model_deployment("h", "org/m-10g", level="Hot"))
    running = OperatorThread(cluster, gateway_url=gateway.url).start()
    try:
        wait_for(lambda: cluster.condition("h", "Placed").get("reason") == "PlacedHot", what="placed Hot")
        # the gateway's own /status entry for a wait that began 12 s ago (its seconds change each poll)
        gateway.gpu_wait_live("ml/h", GpuWait(model="ml/h", resources={"ndif_gpu_2": 0.5}, node="3f2a9c1b0d4e77",
                                              since=time.time() - 12, timeout_s=300, holders=("ml/other",)))
        cluster.set_app_status("md-ml-h", "DEPLOYING")
        wait_for(lambda: cluster.condition("h", "Ready").get("reason") == "WaitingForGpu", what="the wait shown")
        shown = cluster.condition("h", "Ready")
        assert "held by ml/other" in shown["message"] and "waiting since " in shown["message"]
        # Polled again while the wait lasts (seconds later): the condition is not rewritten.
        polls = len(gateway.keys_seen)
        wait_for(lambda: len(gateway.keys_seen) >= polls + 2, what="two more polls of the gateway")
        assert cluster.condition("h", "Ready") == shown

        def wait_events() -> list[dict[str, Any]]:
            return [e for e in cluster.emu.list_sync(cluster.emu.rtype("", "v1", "events"))
                    if e["involvedObject"]["name"] == "h" and e["reason"] == "ReadyWaitingForGpu"]

        # Kopf posts events from its own queue, after the status patch: wait for it to arrive.
        wait_for(lambda: bool(wait_events()), what="the ReadyWaitingForGpu event")
        events = wait_events()
        assert events[0]["type"] == "Normal" and "held by ml/other" in events[0]["message"]
        gateway.gpu_wait("ml/h", None)  # the share came free: the replica loads, then runs
        wait_for(lambda: cluster.condition("h", "Ready").get("reason") == "ApplicationDeploying",
                 what="the wait over (polled while deploying)")
        cluster.set_app_status("md-ml-h", "RUNNING")
        wait_for(lambda: cluster.condition("h", "Ready").get("status") == "True", what="ready")
    finally:
        running.stop()

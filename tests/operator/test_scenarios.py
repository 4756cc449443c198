"""The issue's scenarios: kubectl, restart, capacity, missing RayService, 409 storms, invalid specs, upgrades."""

from __future__ import annotations

import json

from kube_emulator import RAY_SERVICE
from operator_harness import (
    MD_TYPE,
    NAMESPACE,
    ROOT,
    Cluster,
    OperatorThread,
    model_deployment,
    ray_service,
    wait_for,
)

EXAMPLES = [arg for path in sorted((ROOT / "examples").glob("0*.yaml")) for arg in ("-f", str(path))]


def placed(cluster: Cluster, name: str, namespace: str = NAMESPACE) -> bool:
    obj = cluster.md(name, namespace) or {}
    placed = next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == "Placed"), {})
    return placed.get("status") == "True" and obj["status"].get("observedGeneration") == obj["metadata"]["generation"]


def test_kubectl_apply_get_columns_and_delete(cluster: Cluster, operator: OperatorThread) -> None:
    cluster.emu.create_sync({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ndif"}})
    cluster.emu.create_sync(ray_service(namespace="ndif", groups=(("gpu", 2, 4, "80Gi"),)))
    # The Secrets the examples name, where the operator reads them (its own namespace).
    cluster.secret("hf-token", {"token": "hf_example"})
    cluster.secret("s3-credentials", {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "example"})
    cluster.kubectl("apply", *EXAMPLES)
    names = ["gpt2", "llama-3-1-70b", "llama-3-1-8b", "llama-3-1-8b-instruct", "pythia-1-4b"]
    wait_for(lambda: all(placed(cluster, n, "ndif") for n in names), what="all examples placed")
    table = cluster.kubectl("get", "modeldeployments", "-n", "ndif").stdout
    header, *rows = table.strip().splitlines()
    assert header.split() == ["NAME", "MODEL", "LEVEL", "READY", "REPLICAS", "GPUS", "MEMORY", "BOOKED-UNTIL", "AGE"]
    gpt2 = next(r for r in rows if r.startswith("gpt2 ")).split()
    assert gpt2[1:4] == ["openai-community/gpt2", "Hot", "False"]
    warm = next(r for r in rows if r.startswith("llama-3-1-8b ")).split()
    assert warm[2] == "Warm"
    wide = cluster.kubectl("get", "md", "gpt2", "-n", "ndif", "-o", "wide").stdout
    assert "PHASE" in wide and "Deploying" in wide
    # Re-applying unchanged manifests is a no-op for the operator: no new RayService patch.
    patches = cluster.rs_patches()
    cluster.kubectl("apply", *EXAMPLES)
    operator_passes_settle(cluster)
    assert cluster.rs_patches() == patches
    cluster.kubectl("delete", "-n", "ndif", "md", "gpt2", "--timeout=30s")
    assert cluster.md("gpt2", "ndif") is None
    assert "md-ndif-gpt2" not in cluster.apps()


def operator_passes_settle(cluster: Cluster) -> None:
    """Wait until the operator has had the chance to react (two debounce windows plus a pass)."""
    import time

    time.sleep(1.0)


def test_restart_midway_loses_nothing_and_repeats_nothing(cluster: Cluster) -> None:
    cluster.emu.create_sync(ray_service(groups=(("gpu", 2, 2, "80Gi"),)))
    first = OperatorThread(cluster).start()
    for i in range(4):
        cluster.emu.create_sync(model_deployment(f"m{i}", f"org/m-{10 + i}g"))
    wait_for(lambda: all(placed(cluster, f"m{i}") for i in range(4)), what="4 placed")
    first.stop()
    config_before = cluster.rs()["spec"]["serveConfigV2"]  # type: ignore[index]
    statuses_before = {f"m{i}": (cluster.md(f"m{i}") or {})["status"] for i in range(4)}
    # While the operator is down: one new model, one change.
    cluster.emu.create_sync(model_deployment("late", "org/m-5g"))
    cluster.emu.patch_sync(MD_TYPE, NAMESPACE, "m0", {"spec": {"replicas": 2}})
    patches = cluster.rs_patches()
    second = OperatorThread(cluster).start()
    try:
        wait_for(lambda: placed(cluster, "late") and placed(cluster, "m0"), what="work done after restart")
        wait_for(lambda: all("ndif.dev/assignments" in ((cluster.md(n) or {})["metadata"].get("annotations") or {})
                             for n in ("late", "m0", "m1", "m2", "m3")), what="metadata written")
        apps = cluster.apps()
        assert cluster.replicas("md-ml-m0") == 2 and "md-ml-late" in apps
        assert cluster.rs_patches() == patches + 1  # one pass picked up both changes
        old_apps = {a["name"]: a for a in json.loads(config_before)["applications"]}
        for name in ("md-ml-m1", "md-ml-m2", "md-ml-m3"):
            assert apps[name] == old_apps[name]  # untouched models keep identical config (no reload)
        for name in ("m1", "m2", "m3"):
            assert (cluster.md(name) or {})["status"]["placement"] == statuses_before[name]["placement"]
    finally:
        second.stop()
    # A restart with nothing changed writes nothing at all.
    config = cluster.rs()["spec"]["serveConfigV2"]  # type: ignore[index]
    patches, writes = cluster.rs_patches(), len(cluster.emu.requests("PATCH", r"/modeldeployments/"))
    reads = len(cluster.emu.requests("GET", r"/rayservices/ndif$"))
    third = OperatorThread(cluster).start()
    try:
        wait_for(lambda: len(cluster.emu.requests("GET", r"/rayservices/ndif$")) > reads, what="a pass")
        operator_passes_settle(cluster)
    finally:
        third.stop()
    assert cluster.rs()["spec"]["serveConfigV2"] == config  # type: ignore[index]
    assert cluster.rs_patches() == patches
    assert len(cluster.emu.requests("PATCH", r"/modeldeployments/")) == writes, cluster.emu.requests(
        "PATCH", r"/modeldeployments/")[writes:]


def test_capacity_exhausted_evicts_lower_priority_to_warm(cluster: Cluster, operator: OperatorThread) -> None:
    cluster.emu.create_sync(ray_service(groups=(("gpu", 1, 1, "80Gi"),)))
    cluster.emu.create_sync(model_deployment("low", "org/low-60g", priority=0))
    wait_for(lambda: placed(cluster, "low"), what="low placed")
    cluster.emu.create_sync(model_deployment("high", "org/high-60g", priority=10))
    wait_for(lambda: placed(cluster, "high"), what="high placed")
    wait_for(lambda: (cluster.md("low") or {})["status"]["level"] == "Warm", what="low evicted")
    assert (cluster.md("low") or {})["status"]["phase"] == "Warm"
    placed_condition = cluster.condition("low", "Placed")
    assert (placed_condition["status"], placed_condition["reason"]) == ("False", "Evicted")
    assert "ml/high" in placed_condition["message"]
    assert cluster.gpu_share("md-ml-low") == 0
    assert cluster.gpu_share("md-ml-high") == 0.75  # 60 of 80 GiB
    def evicted() -> list[dict[str, str]]:
        events = cluster.emu.list_sync(cluster.emu.rtype("", "v1", "events"))
        return [e for e in events if e["involvedObject"]["name"] == "low" and e["reason"] == "Evicted"]

    assert wait_for(evicted, what="an Evicted event")[0]["type"] == "Warning"


def test_ray_service_missing_then_created(cluster: Cluster, operator: OperatorThread) -> None:
    cluster.emu.create_sync(model_deployment("m", "org/m-10g"))
    wait_for(lambda: cluster.condition("m", "Placed").get("reason") == "RayServiceMissing", what="missing")
    assert "ml/ndif" in cluster.condition("m", "Placed")["message"]
    cluster.emu.create_sync(ray_service())
    wait_for(lambda: placed(cluster, "m"), what="placed after the RayService appeared")
    assert "md-ml-m" in cluster.apps()


def test_conflict_and_server_error_storms_are_retried(cluster: Cluster, operator: OperatorThread) -> None:
    cluster.emu.create_sync(ray_service())
    cluster.emu.inject("PATCH", r"/rayservices/ndif$", 409, times=6)
    cluster.emu.inject("PATCH", r"/modeldeployments/[^/]+/status$", 409, times=4)
    cluster.emu.inject("PATCH", r"/modeldeployments/[^/]+$", 500, times=3)
    cluster.emu.inject("GET", r"/rayservices/ndif$", 503, times=3)
    for i in range(3):
        cluster.emu.create_sync(model_deployment(f"m{i}", f"org/m-{i + 1}g"))
    wait_for(lambda: all(placed(cluster, f"m{i}") for i in range(3)), timeout=30, what="placed despite storms")
    wait_for(lambda: set(cluster.apps()) == {"gateway", "md-ml-m0", "md-ml-m1", "md-ml-m2"}, timeout=30)
    assert [f.remaining for f in cluster.emu.faults] == [0, 0, 0, 0]
    assert operator.thread.is_alive() and operator.error is None


def test_invalid_specs_are_rejected_or_reported(cluster: Cluster, operator: OperatorThread) -> None:
    cluster.emu.create_sync(ray_service())
    bad = cluster.kubectl("apply", "-f", "-", check=False, stdin=json.dumps(
        model_deployment("bad", "org/m-1g", dedicated=True, level="Warm")))
    assert bad.returncode != 0 and "dedicated" in bad.stderr
    assert cluster.md("bad") is None
    # Valid alone, invalid together: one repo id served twice in one RayService.
    cluster.emu.create_sync(model_deployment("first", "org/Same-1g"))
    wait_for(lambda: placed(cluster, "first"))
    cluster.emu.create_sync(model_deployment("second", "org/same-1g"))
    wait_for(lambda: cluster.condition("second", "Placed").get("reason") == "InvalidSpec", what="InvalidSpec")
    second = cluster.md("second") or {}
    assert second["status"]["phase"] == "Failed" and "ml/first" in second["status"]["message"]
    assert "md-ml-second" not in cluster.apps()
    # An estimate failure is reported, not retried in a loop.
    cluster.emu.create_sync(model_deployment("broken", "org/broken-model"))
    wait_for(lambda: cluster.condition("broken", "Evaluated").get("reason") == "EstimateFailed")


def test_app_failure_and_upgrade_freeze(cluster: Cluster, operator: OperatorThread) -> None:
    cluster.emu.create_sync(ray_service())
    cluster.emu.create_sync(model_deployment("m", "org/m-10g"))
    wait_for(lambda: placed(cluster, "m"))
    cluster.set_app_status("md-ml-m", "DEPLOY_FAILED", message="ImportError: no module named foo")
    wait_for(lambda: cluster.condition("m", "Ready").get("reason") == "ApplicationFailed")
    assert (cluster.md("m") or {})["status"]["phase"] == "Failed"
    assert "ImportError" in cluster.condition("m", "Ready")["message"]
    # KubeRay starts a pending cluster: nothing may move until it is done.
    cluster.emu.patch_sync(RAY_SERVICE, NAMESPACE, "ndif", {"status": {"conditions": [
        {"type": "UpgradeInProgress", "status": "True", "reason": "BothActivePendingClustersExist",
         "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}, subresource="status")
    config = cluster.rs()["spec"]["serveConfigV2"]  # type: ignore[index]
    cluster.emu.patch_sync(MD_TYPE, NAMESPACE, "m", {"spec": {"replicas": 2}})
    wait_for(lambda: cluster.condition("m", "Placed").get("reason") == "UpgradeInProgress", what="frozen")
    assert cluster.rs()["spec"]["serveConfigV2"] == config  # type: ignore[index]
    cluster.emu.patch_sync(RAY_SERVICE, NAMESPACE, "ndif", {"status": {"conditions": [
        {"type": "UpgradeInProgress", "status": "False", "reason": "NoPendingCluster",
         "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}, subresource="status")
    wait_for(lambda: placed(cluster, "m") and cluster.replicas("md-ml-m") == 2)


def test_foreign_edit_of_serve_config_is_restored(cluster: Cluster, operator: OperatorThread) -> None:
    cluster.emu.create_sync(ray_service())
    cluster.emu.create_sync(model_deployment("m", "org/m-10g"))
    wait_for(lambda: placed(cluster, "m"))
    ours = cluster.rs()["spec"]["serveConfigV2"]  # type: ignore[index]
    cluster.emu.patch_sync(RAY_SERVICE, NAMESPACE, "ndif", {"spec": {"serveConfigV2": "applications: []\n"}})
    wait_for(lambda: cluster.rs()["spec"]["serveConfigV2"] == ours, what="restored")  # type: ignore[index]
    wait_for(lambda: any(e["reason"] == "ServeConfigOverwritten" and e["involvedObject"]["kind"] == "RayService"
                         for e in cluster.emu.list_sync(cluster.emu.rtype("", "v1", "events"))), what="event")


def test_a_burst_of_deployments_costs_a_handful_of_patches(cluster: Cluster, operator: OperatorThread) -> None:
    cluster.emu.create_sync(ray_service(groups=(("gpu", 8, 8, "80Gi"),)))
    for i in range(40):
        cluster.emu.create_sync(model_deployment(f"m{i:02d}", f"org/m{i:02d}-2g"))
    wait_for(lambda: len(cluster.apps()) == 41 and all(placed(cluster, f"m{i:02d}") for i in range(40)),
             timeout=60, what="40 placed")
    assert cluster.rs_patches() <= 4


def test_kuberay_serve_update_failure_is_surfaced(cluster: Cluster, operator: OperatorThread) -> None:
    cluster.emu.create_sync(ray_service())
    cluster.emu.create_sync(model_deployment("m", "org/m-10g"))
    wait_for(lambda: placed(cluster, "m"))
    rs = cluster.rs() or {}
    event = {"apiVersion": "v1", "kind": "Event", "type": "Warning", "reason": "FailedToUpdateServeApplications",
             "message": "dashboard rejected the config", "lastTimestamp": "2099-01-01T00:00:00Z",
             "metadata": {"name": "ndif.kuberay1", "namespace": NAMESPACE},
             "involvedObject": {"kind": "RayService", "name": "ndif", "namespace": NAMESPACE,
                                "uid": rs["metadata"]["uid"]}}
    cluster.emu.create_sync(event)
    cluster.set_app_status("md-ml-m", "DEPLOYING")  # KubeRay's status update wakes the operator
    wait_for(lambda: cluster.condition("m", "Ready").get("reason") == "RayServiceError", what="RayServiceError")
    assert "dashboard rejected the config" in cluster.condition("m", "Ready")["message"]
    cluster.emu.create_sync({**event, "type": "Normal", "reason": "UpdatedServeApplications", "message": "",
                             "lastTimestamp": "2099-01-01T00:01:00Z",
                             "metadata": {"name": "ndif.kuberay2", "namespace": NAMESPACE}})
    cluster.set_app_status("md-ml-m", "RUNNING")
    wait_for(lambda: cluster.condition("m", "Ready").get("status") == "True", what="recovered")


def test_models_go_to_the_ray_service_they_name(cluster: Cluster, operator: OperatorThread) -> None:
    cluster.emu.create_sync(ray_service())
    cluster.emu.create_sync(ray_service("other", groups=(("a10", 1, 1, "24Gi"),)))
    cluster.emu.create_sync(model_deployment("default-target", "org/a-5g"))
    cluster.emu.create_sync(model_deployment("named-target", "org/b-5g", rayService="other"))
    wait_for(lambda: placed(cluster, "default-target") and placed(cluster, "named-target"))
    assert set(cluster.apps()) == {"gateway", "md-ml-default-target"}
    assert set(cluster.apps("other")) == {"gateway", "md-ml-named-target"}
    assert (cluster.md("named-target") or {})["status"]["placement"]["workerGroup"] == "a10"

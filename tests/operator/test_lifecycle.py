"""Create, update, delete and restart, through real kopf, real kubectl and real HTTP."""

from __future__ import annotations

from operator_harness import (
    MD_TYPE,
    NAMESPACE,
    Cluster,
    OperatorThread,
    model_deployment,
    ray_service,
    wait_for,
)

from ndif_operator.api import GatewayAppArgs, GatewayUserConfig, ModelAppArgs


def test_create_places_hot_and_patches_only_serve_config(cluster: Cluster, operator: OperatorThread) -> None:
    rs = cluster.emu.create_sync(ray_service())
    cluster.emu.create_sync(model_deployment("small", "org/m-20g"))
    wait_for(lambda: cluster.condition("small", "Placed").get("status") == "True", what="Placed")
    wait_for(lambda: (cluster.md("small") or {})["metadata"].get("finalizers"), what="finalizer")
    md = cluster.md("small")
    assert md is not None
    status = md["status"]
    assert status["level"] == "Hot" and status["replicas"] == 1
    assert status["placement"]["workerGroup"] == "gpu" and 0 < status["placement"]["gpusPerReplica"] <= 1
    assert status["observedGeneration"] == 1 and status["estimate"]["totalBytes"] == 20 * 2**30
    assert "ndif.dev/finalizer" in md["metadata"]["finalizers"]
    apps = cluster.apps()
    GatewayAppArgs.model_validate(apps["gateway"]["args"])
    routes = GatewayUserConfig.model_validate(apps["gateway"]["deployments"][0]["user_config"]).models
    assert {k: r.app for k, r in routes.items()} == {"org/m-20g": "md-ml-small"}
    assert ModelAppArgs.model_validate(apps["md-ml-small"]["args"]).repo_id == "org/m-20g"
    after = cluster.rs()
    assert after is not None and after["spec"]["rayClusterConfig"] == rs["spec"]["rayClusterConfig"]
    ready = cluster.condition("small", "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ApplicationMissing")
    # KubeRay reports the app RUNNING: Ready comes from the per-application status.
    cluster.set_app_status("md-ml-small", "RUNNING")
    wait_for(lambda: cluster.condition("small", "Ready").get("status") == "True", what="Ready")
    md = cluster.md("small")
    assert md is not None and md["status"]["readyReplicas"] == 1 and md["status"]["phase"] == "Ready"
    def reasons() -> set[str]:
        return {e["reason"] for e in cluster.emu.list_sync(cluster.emu.rtype("", "v1", "events"))
                if e["involvedObject"]["name"] == "small"}

    wait_for(lambda: {"PlacedHot", "ReadyApplicationRunning"} <= reasons(), what="transition events")


def test_update_replicas_and_level_then_delete(cluster: Cluster, operator: OperatorThread) -> None:
    cluster.emu.create_sync(ray_service())
    cluster.emu.create_sync(model_deployment("m", "org/m-30g"))
    wait_for(lambda: cluster.condition("m", "Placed").get("status") == "True")
    cluster.emu.patch_sync(MD_TYPE, NAMESPACE, "m", {"spec": {"replicas": 2}})
    wait_for(lambda: (cluster.md("m") or {}).get("status", {}).get("replicas") == 2, what="2 replicas")
    assert cluster.replicas("md-ml-m") == 2
    assert (cluster.md("m") or {})["status"]["observedGeneration"] == 2
    cluster.emu.patch_sync(MD_TYPE, NAMESPACE, "m", {"spec": {"level": "Warm"}})
    wait_for(lambda: (cluster.md("m") or {}).get("status", {}).get("level") == "Warm", what="Warm")
    deployment = cluster.apps()["md-ml-m"]["deployments"][0]
    assert deployment["ray_actor_options"]["num_gpus"] == 0 and deployment["user_config"]["level"] == "Warm"
    cluster.emu.delete_sync(MD_TYPE, NAMESPACE, "m")
    wait_for(lambda: cluster.md("m") is None, what="finalizer released")
    assert "md-ml-m" not in cluster.apps()
    assert cluster.apps()["gateway"]["deployments"][0]["user_config"]["models"] == {}

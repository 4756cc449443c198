"""Pinned rendering: every replica slot and TP rank asks Ray for exactly the planner's pod and GPU."""

from __future__ import annotations

from typing import Any

import pytest

from model_runtime.replica.gpu_binding import bind_pinned_gpu, rank_actor_options
from ndif_operator.api import Estimate, GatewayUserConfig, Level, ModelDeployment, Reason
from ndif_operator.api.pinning import node_labels, node_resources, pinned_gpu_index, pod_label_value
from ndif_operator.local.embedded import LocalSettings
from ndif_operator.local.inventory import Machine, build_inventory
from ndif_operator.local.ray_head import start_command
from ndif_operator.planning import Decision, Plan, ReplicaPlacement
from ndif_operator.rendering import RenderOptions, check_serve_config, render_serve_config
from ndif_operator.rendering.pinned import slot_app_names
from ndif_operator.rendering.serve_config import MODEL_REPLICA_ENV

# What every rendered model replica carries (rendering/serve_config.py MODEL_REPLICA_ENV).
MODEL_ENV = {"runtime_env": {"env_vars": dict(MODEL_REPLICA_ENV)}}


def md(name: str, **spec: object) -> ModelDeployment:
    return ModelDeployment.model_validate({"metadata": {"name": name, "namespace": "ml"},
                                           "spec": {"model": {"repoId": f"org/{name}"}, **spec}})


def hot(key: str, *slots: tuple[int, tuple[int, ...]], fraction: float) -> Decision:
    ranks = len(slots[0][1])
    return Decision(key=key, level=Level.HOT, replicas=len(slots), gpus_per_replica=ranks * fraction,
                    gpu_fraction=fraction, worker_group="h100",
                    assignments=tuple(ReplicaPlacement(pod=p, gpus=g, fraction=fraction) for p, g in slots),
                    reason=Reason.PLACED_HOT, message="")


def apps(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["name"]: a["deployments"][0] for a in config["applications"]}


DEPLOYMENTS = {"ml/small": md("small", replicas=2), "ml/tp": md("tp", tensorParallelSize=4),
               "ml/warm": md("warm", level="Warm")}
WARM = Decision(key="ml/warm", level=Level.WARM, replicas=0, gpus_per_replica=0, gpu_fraction=0,
                worker_group="h100", assignments=(ReplicaPlacement(pod=1, gpus=(), fraction=0),),
                reason=Reason.PLACED_WARM, message="")
PLAN = Plan(decisions=(
    hot("ml/small", (0, (3,)), (1, (5,)), fraction=0.2501),
    hot("ml/tp", (1, (0, 1, 2, 6)), fraction=0.6),
    WARM,
))
ESTIMATES = {"ml/warm": Estimate(weights_bytes=1000, total_bytes=2000, method="Config")}


def test_each_replica_slot_is_an_app_pinned_to_its_pod_and_gpu() -> None:
    config = render_serve_config(PLAN, DEPLOYMENTS, estimates=ESTIMATES)
    check_serve_config(config)
    got = apps(config)
    # A single-GPU slot: the replica is pinned to its pod, and leases its GPU share when HOT.
    assert got["md-ml-small"]["ray_actor_options"] == {"num_gpus": 0, "label_selector": {"ndif.dev/pod": "h100-0"},
                                                 **MODEL_ENV}
    assert got["md-ml-small"]["user_config"]["gpu_lease"] == {"ndif_gpu_3": 0.2501}
    assert got["md-ml-small_r1"]["ray_actor_options"] == {"num_gpus": 0, "label_selector": {"ndif.dev/pod": "h100-1"},
                                                 **MODEL_ENV}
    assert got["md-ml-small_r1"]["user_config"]["gpu_lease"] == {"ndif_gpu_5": 0.2501}
    assert got["md-ml-small"]["num_replicas"] == got["md-ml-small_r1"]["num_replicas"] == 1
    # A WARM copy is pinned to the pod whose CPU RAM the planner counted it in (its host copy is in
    # that node's object store), and holds no GPU.
    assert got["md-ml-warm"]["ray_actor_options"] == {"num_gpus": 0, "label_selector": {"ndif.dev/pod": "h100-1"},
                                                 **MODEL_ENV}
    assert got["md-ml-warm"]["user_config"]["gpu_lease"] == {}
    table = GatewayUserConfig.model_validate(config["applications"][0]["deployments"][0]["user_config"]).models
    assert table["org/small"].apps == ["md-ml-small", "md-ml-small_r1"] and table["org/small"].app == "md-ml-small"
    assert slot_app_names("md-ml-small", list(got)) == ["md-ml-small", "md-ml-small_r1"]


def test_pinned_warm_to_hot_on_one_pod_is_applied_in_place() -> None:
    """WARM on pod 1, then HOT on pod 1's GPU 4: only what Serve applies to a running replica
    differs (user_config: level and GPU lease; replica count), so the process is kept."""
    deployments = {"ml/warm": DEPLOYMENTS["ml/warm"]}
    hot_plan = Plan(decisions=(Decision(
        key="ml/warm", level=Level.HOT, replicas=1, gpus_per_replica=0.5, gpu_fraction=0.5, worker_group="h100",
        assignments=(ReplicaPlacement(pod=1, gpus=(4,), fraction=0.5),), reason=Reason.PLACED_HOT, message=""),))
    warm = render_serve_config(Plan(decisions=(WARM,)), deployments, estimates=ESTIMATES)["applications"][1]
    hot = render_serve_config(hot_plan, deployments, estimates=ESTIMATES)["applications"][1]
    in_place = {"user_config", "num_replicas", "autoscaling_config"}
    assert {k: v for k, v in warm.items() if k != "deployments"} == {k: v for k, v in hot.items() if k != "deployments"}
    (w,), (h,) = warm["deployments"], hot["deployments"]
    assert {k: v for k, v in w.items() if k not in in_place} == {k: v for k, v in h.items() if k not in in_place}
    assert (w["user_config"]["gpu_lease"], h["user_config"]["gpu_lease"]) == ({}, {"ndif_gpu_4": 0.5})
    assert hot["args"]["gpus_per_replica"] == 0  # the device comes from the lease, at run time


def test_tensor_parallel_ranks_each_pin_their_gpu_in_their_bundle() -> None:
    got = apps(render_serve_config(PLAN, DEPLOYMENTS, options=RenderOptions(replica_num_cpus=0)))["md-ml-tp"]
    assert got["ray_actor_options"] == {"num_gpus": 0, "num_cpus": 0, "resources": {"ndif_gpu_0": 0.6}, **MODEL_ENV}
    assert got["placement_group_bundles"] == [{"ndif_gpu_0": 0.6}, {"ndif_gpu_1": 0.6}, {"ndif_gpu_2": 0.6},
                                              {"ndif_gpu_6": 0.6}]
    assert got["placement_group_bundle_label_selector"] == [{"ndif.dev/pod": "h100-1"}] * 4
    assert got["placement_group_strategy"] == "STRICT_PACK"
    # Serve's default replica CPU (1) must be in bundle 0, which holds the replica actor.
    default = apps(render_serve_config(PLAN, DEPLOYMENTS))["md-ml-tp"]
    assert default["placement_group_bundles"][0] == {"ndif_gpu_0": 0.6, "CPU": 1}


def test_moving_one_slot_leaves_the_other_slots_config_unchanged() -> None:
    before = apps(render_serve_config(PLAN, DEPLOYMENTS, estimates=ESTIMATES))
    moved = Plan(decisions=(hot("ml/small", (0, (3,)), (0, (7,)), fraction=0.2501), *PLAN.decisions[1:]))
    after = apps(render_serve_config(moved, DEPLOYMENTS, estimates=ESTIMATES))
    assert after["md-ml-small"] == before["md-ml-small"]  # Serve keeps this replica running
    assert after["md-ml-small_r1"] != before["md-ml-small_r1"]
    assert {k: v for k, v in after.items() if "small" not in k} == {k: v for k, v in before.items() if "small" not in k}


def test_autoscaling_slots_past_the_minimum_scale_between_zero_and_one() -> None:
    deployments = {"ml/auto": md("auto", replicas=2, autoscaling={"minReplicas": 1, "maxReplicas": 4,
                                                                   "targetOngoingRequests": 1})}
    plan = Plan(decisions=(hot("ml/auto", *((p, (g,)) for p, g in ((0, 0), (0, 1), (1, 0), (1, 1))),
                               fraction=0.5),))
    config = render_serve_config(plan, deployments)
    check_serve_config(config)
    got = apps(config)
    assert got["md-ml-auto"]["num_replicas"] == 1
    scaling = [got[f"md-ml-auto_r{n}"]["autoscaling_config"] for n in (1, 2, 3)]
    assert [s["initial_replicas"] for s in scaling] == [1, 0, 0]  # spec.replicas 2 start
    assert all(s["min_replicas"] == 0 and s["max_replicas"] == 1 for s in scaling)


def test_cpu_only_and_unpinned_render_one_app_per_model() -> None:
    for options in (RenderOptions(cpu_only=True), RenderOptions(pin_gpus=False)):
        got = apps(render_serve_config(PLAN, DEPLOYMENTS, options=options, estimates=ESTIMATES))
        assert "md-ml-small_r1" not in got and got["md-ml-small"]["num_replicas"] == 2
        assert all("label_selector" not in d["ray_actor_options"] for d in got.values())


def test_node_declarations_and_the_runtime_agree_on_names() -> None:
    assert node_resources(2) == {"ndif_gpu_0": 1, "ndif_gpu_1": 1}
    assert node_labels("h100", 3) == {"ndif.dev/pod": "h100-3"}
    with pytest.raises(ValueError, match="label value"):
        pod_label_value("x" * 70, 0)
    assert pinned_gpu_index({"CPU": 1, "ndif_gpu_6": 0.6}) == 6
    # Inside a placement group Ray reports the bundle's renamed resources.
    assert pinned_gpu_index({"ndif_gpu_2_group_1_0f1e2d3c4b5a": 0.6, "ndif_gpu_2_group_0f1e2d3c4b5a": 0.6}) == 2
    assert pinned_gpu_index({"GPU": 0.5}) is None
    env: dict[str, str] = {"CUDA_VISIBLE_DEVICES": ""}
    assert bind_pinned_gpu({"ndif_gpu_5": 0.25}, env) == 5 and env["CUDA_VISIBLE_DEVICES"] == "5"
    assert bind_pinned_gpu({}, env := {}) is None and env == {}
    assert rank_actor_options({"CPU": 0.5, "ndif_gpu_2": 0.6}) == {"num_cpus": 0.5, "num_gpus": 0,
                                                                  "resources": {"ndif_gpu_2": 0.6}}


def test_local_mode_declares_its_gpus_and_pod() -> None:
    local = build_inventory(Machine((80 * 2**30, 80 * 2**30), 64 * 2**30))
    cmd = start_command(LocalSettings(manifests=()).head_spec(local), "ray")
    assert '--resources={"ndif_gpu_0":1,"ndif_gpu_1":1}' in cmd and "--labels=ndif.dev/pod=local-0" in cmd
    cpu = build_inventory(Machine((), 64 * 2**30))
    assert not any(a.startswith("--resources") for a in start_command(LocalSettings(manifests=()).head_spec(cpu)))


def test_operator_warns_about_worker_groups_that_cannot_host_pinned_replicas() -> None:
    from ndif_operator.api.pinning import kuberay_ray_start_params
    from ndif_operator.operator.inventory import read_inventory

    def service(params: dict[str, str]) -> dict[str, Any]:
        return {"spec": {"rayClusterConfig": {"workerGroupSpecs": [{
            "groupName": "h100", "replicas": 2, "rayStartParams": params,
            "template": {"metadata": {"annotations": {"ndif.dev/gpu-memory": "80Gi"}},
                         "spec": {"containers": [{"resources": {"limits": {"nvidia.com/gpu": "2"}}}]}}}]}}}

    assert any("pinning resources" in w for w in read_inventory(service({})).warnings)
    assert read_inventory(service(kuberay_ray_start_params("h100", 2))).warnings == ()

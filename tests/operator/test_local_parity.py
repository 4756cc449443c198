"""The operator and local mode turn the same manifests and inventory into the same model apps.

Both call the one request builder (`ndif_operator.planning.requests`), the planner and the
renderer; this runs the real operator against the test API server and local mode's pipeline
side by side, so that a second copy of any step (e.g. one that drops autoscaling bounds) shows.
"""

from __future__ import annotations

from typing import Any

from operator_harness import Cluster, OperatorThread, model_deployment, ray_service, size_estimator, wait_for

from ndif_operator.api import ModelDeployment
from ndif_operator.local.inventory import LocalInventory
from ndif_operator.local.pipeline import plan_local
from ndif_operator.operator.inventory import read_inventory

# What only the render options change (local mode runs replicas with 0 CPUs and its own env).
_OPTION_KEYS = {"num_cpus", "runtime_env", "memory", "CPU"}


def _model_apps(config: dict[str, Any]) -> dict[str, Any]:
    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in _OPTION_KEYS}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return {app["name"]: strip(app) for app in config["applications"] if app["name"].startswith("md-")}


def test_operator_and_local_mode_render_the_same_model_apps(cluster: Cluster, operator: OperatorThread) -> None:
    service = ray_service(groups=(("gpu", 2, 4, "80Gi"),))
    cluster.emu.create_sync(service)
    manifests = [
        model_deployment("auto", "org/m-10g", replicas=2, autoscaling={"minReplicas": 1, "maxReplicas": 4}),
        model_deployment("big", "org/m-150g", tensorParallelSize="auto"),
        model_deployment("fixed", "org/m-30g", replicas=3),
        model_deployment("warm", "org/m-20g", level="Warm"),
    ]
    for manifest in manifests:
        cluster.emu.create_sync(manifest)
    names = [m["metadata"]["name"] for m in manifests]
    wait_for(lambda: all(cluster.condition(n, "Placed").get("status") == "True" for n in names),
             what="all placed by the operator")
    operator_apps = _model_apps(cluster.serve_config())

    deployments = [ModelDeployment.model_validate(m) for m in manifests]
    sized = {f"{md.metadata['namespace']}/{md.metadata['name']}": size_estimator(md.spec.model, md.spec.limits)
             for md in deployments}
    local = LocalInventory(read_inventory(service).inventory, cpu_only=False)
    local_apps = _model_apps(plan_local(deployments, local, serve_port=8000, sized=sized).config)

    assert local_apps == operator_apps
    # The case that disagreed: autoscaling 1..4 reserves and renders up to 4 replicas in both.
    auto = [app for name, app in operator_apps.items() if name.startswith("md-ml-auto")]
    scaling = [d.get("autoscaling_config") or {"max_replicas": d["num_replicas"]}
               for app in auto for d in app["deployments"]]
    assert sum(s["max_replicas"] for s in scaling) == 4

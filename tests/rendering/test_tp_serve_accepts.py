"""Rendered tensor-parallel apps are what Ray Serve itself accepts (its own ReplicaConfig logic).

The project's schema check cannot see Serve's defaults: with `num_cpus` unset Serve gives a
replica actor 1 CPU, and a placement group whose bundle 0 has no CPU then fails the deploy
("the bundle only has 0 `CPU` specified"). These tests hand every rendered TP deployment to
`ray.serve._private.config.ReplicaConfig.create`, the code Serve's controller runs.
"""

from __future__ import annotations

import pytest

from ndif_operator.api import Level, ModelDeployment, Reason
from ndif_operator.planning import Decision, Plan, ReplicaPlacement
from ndif_operator.rendering import RenderOptions, check_serve_config, render_serve_config

pytest.importorskip("ray.serve")
from ray.serve._private.config import ReplicaConfig

DEPLOYMENT = ModelDeployment.model_validate({
    "metadata": {"name": "llama", "namespace": "ml"},
    "spec": {"model": {"repoId": "meta-llama/Llama-3.1-70B"}, "tensorParallelSize": 2},
})


def _tp_decision(ranks: int, fraction: float) -> Decision:
    return Decision(
        key="ml/llama", level=Level.HOT, replicas=1, gpus_per_replica=ranks * fraction, gpu_fraction=fraction,
        worker_group="gpu", assignments=(ReplicaPlacement(pod=0, gpus=tuple(range(ranks)), fraction=fraction),),
        reason=Reason.PLACED_HOT, message="",
    )


def _serve_replica_config(options: RenderOptions, ranks: int, fraction: float) -> tuple[dict, ReplicaConfig]:
    config = render_serve_config(Plan(decisions=(_tp_decision(ranks, fraction),)), {"ml/llama": DEPLOYMENT},
                                 options=options)
    check_serve_config(config)  # the project's own schema check
    (deployment,) = next(a for a in config["applications"] if a["name"] != "gateway")["deployments"]
    replica = ReplicaConfig.create(
        "model_runtime.replica.app:ModelReplica",
        ray_actor_options=dict(deployment["ray_actor_options"]),
        placement_group_bundles=deployment.get("placement_group_bundles"),
        placement_group_strategy=deployment.get("placement_group_strategy"),
    )
    return deployment, replica


@pytest.mark.parametrize("num_cpus", [None, 0, 0.5, 2])
@pytest.mark.parametrize("cpu_only", [False, True])
@pytest.mark.parametrize(("ranks", "fraction"), [(2, 1.0), (4, 0.6), (8, 1.0)])
def test_serve_accepts_every_rendered_tp_replica(num_cpus: float | None, cpu_only: bool, ranks: int,
                                                 fraction: float) -> None:
    options = RenderOptions(replica_num_cpus=num_cpus, cpu_only=cpu_only, hot_host_memory_bytes=2**30)
    deployment, replica = _serve_replica_config(options, ranks, fraction)
    bundles = deployment["placement_group_bundles"]
    assert len(bundles) == ranks and deployment["placement_group_strategy"] == "STRICT_PACK"
    # Serve placed rank 0 in bundle 0 with the resources it will really ask for (defaults applied).
    assert replica.ray_actor_options["num_cpus"] <= bundles[0].get("CPU", 0)
    assert replica.ray_actor_options.get("num_gpus", 0) <= bundles[0].get("GPU", 0)
    # Pinned (the default on GPUs): rank 0's GPU resource is bundle 0's (docs/placement.md "Pinning").
    for name, amount in (replica.ray_actor_options.get("resources") or {}).items():
        assert amount <= bundles[0][name]
    # Every shard actor asks for exactly its bundle, so every bundle is a valid actor request too.
    for bundle in bundles:
        assert any(amount > 0 for name, amount in bundle.items() if name != "memory")


def test_serve_refuses_the_shape_that_used_to_be_rendered() -> None:
    # The regression this guards: bundle 0 with only a GPU and the replica's num_cpus left to Serve.
    with pytest.raises(ValueError, match="the bundle only has 0 `CPU` specified"):
        ReplicaConfig.create("model_runtime.replica.app:ModelReplica", ray_actor_options={"num_gpus": 1},
                             placement_group_bundles=[{"GPU": 1}, {"GPU": 1}], placement_group_strategy="STRICT_PACK")


def test_cpu_only_tp_replica_keeps_its_ranks() -> None:
    # CPU clusters (local mode, tests) run TP over gloo: the ranks are still rendered.
    deployment, _ = _serve_replica_config(RenderOptions(replica_num_cpus=0, cpu_only=True), 2, 1.0)
    assert deployment["ray_actor_options"]["num_gpus"] == 0
    assert deployment["placement_group_bundles"] == [{"CPU": 0.01}, {"CPU": 0.01}]

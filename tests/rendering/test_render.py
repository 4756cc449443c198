"""The renderer: plan + ModelDeployments → Serve config, byte-stable and valid for Ray Serve."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ndif_operator.api import (
    Estimate,
    GatewayAppArgs,
    GatewayUserConfig,
    Level,
    ModelAppArgs,
    ModelDeployment,
    ModelUserConfig,
    Reason,
)
from ndif_operator.api.naming import GATEWAY_APP, MODEL_IMPORT_PATH, model_app_name
from ndif_operator.planning import Decision, Plan, ReplicaPlacement
from ndif_operator.rendering import (
    RenderOptions,
    ServeConfigInvalid,
    check_serve_config,
    render_serve_config,
    serve_config_text,
    validate_serve_config,
)
from ndif_operator.rendering.serve_config import MODEL_REPLICA_ENV

ROOT = Path(__file__).resolve().parents[2]

# What every rendered model replica carries (rendering/serve_config.py MODEL_REPLICA_ENV).
MODEL_ENV = {"runtime_env": {"env_vars": dict(MODEL_REPLICA_ENV)}}


def md(name: str, repo: str, **spec: object) -> ModelDeployment:
    return ModelDeployment.model_validate({
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {"model": {"repoId": repo}, **spec},
    })


def decision(key: str, level: Level, *, replicas: int = 1, gpus: float = 1.0) -> Decision:
    hot = level == Level.HOT
    return Decision(
        key=key, level=level, replicas=replicas if hot else 0, gpus_per_replica=gpus if hot else 0.0,
        gpu_fraction=min(gpus, 1.0) if hot else 1.0, worker_group="gpu" if level != Level.COLD else None,
        assignments=tuple(ReplicaPlacement(pod=i, gpus=tuple(range(max(1, int(gpus)))), fraction=min(gpus, 1.0))
                          for i in range(replicas))
        if hot else (), reason=Reason.PLACED_HOT if hot else Reason.PLACED_WARM, message="",
    )


DEPLOYMENTS = {
    "ml/gpt2": md("gpt2", "openai-community/gpt2", limits={"requestTimeoutSeconds": 30}),
    "ml/llama": md("llama", "meta-llama/Llama-3.1-8B", replicas=2),
    "ml/warm": md("warm", "org/Warm-Model", level="Warm", activateOnRequest=True),
    "ml/cold": md("cold", "org/Cold-Model", level="Cold"),
}
PLAN = Plan(decisions=(
    decision("ml/cold", Level.COLD),
    decision("ml/gpt2", Level.HOT, gpus=1 / 3),
    decision("ml/llama", Level.HOT, replicas=2, gpus=2),
    decision("ml/warm", Level.WARM),
))
ESTIMATES = {"ml/warm": Estimate(weights_bytes=123_456, total_bytes=200_000, method="Config")}
# Ray's own placement (nodes that declare no pinning resources); pinned slots: test_pinned.py.
UNPINNED = RenderOptions(pin_gpus=False)


def test_renders_gateway_and_one_app_per_served_model() -> None:
    config = render_serve_config(PLAN, DEPLOYMENTS, estimates=ESTIMATES, options=UNPINNED)
    apps = {app["name"]: app for app in config["applications"]}
    assert list(apps) == [GATEWAY_APP, "md-ml-gpt2", "md-ml-llama", "md-ml-warm"]  # COLD has no app
    GatewayAppArgs.model_validate(apps[GATEWAY_APP]["args"])  # the runtime parses the very same schema
    assert "models" not in apps[GATEWAY_APP]["args"]  # the routing table is user_config
    table = GatewayUserConfig.model_validate(apps[GATEWAY_APP]["deployments"][0]["user_config"]).models
    assert {k: r.app for k, r in table.items()} == {
        "openai-community/gpt2": "md-ml-gpt2", "meta-llama/llama-3.1-8b": "md-ml-llama",
        "org/warm-model": "md-ml-warm", "org/cold-model": None,  # COLD: routed, no app
    }
    assert (table["org/cold-model"].level, table["org/cold-model"].deployment) == (Level.COLD, "ml/cold")
    assert table["org/warm-model"].level == Level.WARM and table["org/warm-model"].activate_on_request
    assert table["meta-llama/llama-3.1-8b"].repo_id == "meta-llama/Llama-3.1-8B"
    llama = apps[model_app_name("ml", "llama")]
    assert llama["import_path"] == MODEL_IMPORT_PATH and llama["route_prefix"] is None
    args = ModelAppArgs.model_validate(llama["args"])  # the runtime parses the very same schema
    assert (args.repo_id, args.tensor_parallel_size, args.gpus_per_replica) == ("meta-llama/Llama-3.1-8B", 2, 2)
    (replica,) = llama["deployments"]
    # Two whole GPUs: the replica actor is rank 0 on one, the placement group holds both.
    # num_cpus is said explicitly (Serve's default of 1) so that bundle 0 holds what rank 0 gets.
    assert replica["num_replicas"] == 2 and replica["ray_actor_options"] == {"num_gpus": 1, "num_cpus": 1, **MODEL_ENV}
    assert replica["placement_group_bundles"] == [{"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}]
    gpt2 = apps["md-ml-gpt2"]["deployments"][0]
    assert gpt2["ray_actor_options"]["num_gpus"] == 0.3333
    assert ModelUserConfig.model_validate(gpt2["user_config"]).request_timeout_seconds == 30
    warm = apps["md-ml-warm"]["deployments"][0]
    assert warm["ray_actor_options"] == {"num_gpus": 0, "memory": 123_456, **MODEL_ENV}
    assert warm["user_config"]["level"] == "Warm" and warm["num_replicas"] == 1
    assert warm["user_config"]["activate_on_request"] is True
    assert validate_serve_config(config) == []


def test_changing_the_set_of_models_changes_only_the_gateways_user_config() -> None:
    """Adding, removing or re-levelling a model must not restart the gateway (its sessions and jobs)."""
    def gateway(plan: Plan, deployments: dict[str, ModelDeployment]) -> dict[str, object]:
        config = render_serve_config(plan, deployments, estimates=ESTIMATES)
        app: dict[str, object] = config["applications"][0]
        assert app["name"] == GATEWAY_APP
        return app

    full = gateway(PLAN, DEPLOYMENTS)
    fewer = gateway(Plan(decisions=PLAN.decisions[:2]), {k: DEPLOYMENTS[k] for k in ("ml/cold", "ml/gpt2")})
    empty = gateway(Plan(decisions=()), {})
    relevelled = gateway(Plan(decisions=(decision("ml/cold", Level.HOT), *PLAN.decisions[1:])), DEPLOYMENTS)
    for other in (fewer, empty, relevelled):
        assert other["deployments"] != full["deployments"]  # the table did change...
        strip = [{k: v for k, v in d.items() if k != "user_config"}
                 for d in (full["deployments"], other["deployments"]) for d in d]  # type: ignore[attr-defined]
        assert strip[0] == strip[1]  # ...but only in user_config
        assert {k: v for k, v in other.items() if k != "deployments"} == {
            k: v for k, v in full.items() if k != "deployments"}  # args, import path, route: the same


def test_a_cold_deployment_does_not_shadow_a_served_one_of_the_same_repo() -> None:
    deployments = {"ml/a-cold": md("a-cold", "org/Same"), "ml/b-hot": md("b-hot", "org/Same")}
    plan = Plan(decisions=(decision("ml/a-cold", Level.COLD), decision("ml/b-hot", Level.HOT)))
    config = render_serve_config(plan, deployments)
    table = GatewayUserConfig.model_validate(config["applications"][0]["deployments"][0]["user_config"]).models
    assert table["org/same"].app == "md-ml-b-hot" and table["org/same"].level == Level.HOT


def test_text_is_byte_stable_and_independent_of_input_order() -> None:
    first = serve_config_text(render_serve_config(PLAN, DEPLOYMENTS, estimates=ESTIMATES))
    shuffled_plan = Plan(decisions=tuple(reversed(PLAN.decisions)))
    shuffled = dict(reversed(list(DEPLOYMENTS.items())))
    assert serve_config_text(render_serve_config(shuffled_plan, shuffled, estimates=ESTIMATES)) == first
    assert json.loads(first)["applications"][0]["name"] == GATEWAY_APP


def test_text_is_identical_in_a_fresh_process() -> None:
    # An operator restart must produce the very same string (no hash seeds, no timestamps).
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_render as t;"
        "from ndif_operator.rendering import render_serve_config, serve_config_text;"
        "print(serve_config_text(render_serve_config(t.PLAN, t.DEPLOYMENTS, estimates=t.ESTIMATES)), end='')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=ROOT).stdout
    assert out == serve_config_text(render_serve_config(PLAN, DEPLOYMENTS, estimates=ESTIMATES))


def test_cpu_only_requests_no_gpus_and_zero_cpus() -> None:
    options = RenderOptions(cpu_only=True, replica_num_cpus=0, gateway_num_cpus=0,
                            replica_env=(("OMP_NUM_THREADS", "1"),))
    config = render_serve_config(PLAN, DEPLOYMENTS, options=options, estimates=ESTIMATES)
    for app in config["applications"]:
        actor = app["deployments"][0]["ray_actor_options"]
        assert actor["num_gpus"] == 0 and actor["num_cpus"] == 0
    llama = next(a for a in config["applications"] if a["name"] == "md-ml-llama")
    assert llama["deployments"][0]["ray_actor_options"]["runtime_env"] == {
        "env_vars": {"OMP_NUM_THREADS": "1", **MODEL_REPLICA_ENV}}
    # A model replica never starts Serve's direct-ingress server nor runs uvloop (its process filter
    # refuses io_uring, which both would use).
    assert MODEL_REPLICA_ENV == {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0", "RAY_USE_UVLOOP": "0"}
    assert validate_serve_config(config) == []


def test_cpu_only_warm_and_hot_differ_only_in_what_serve_applies_in_place() -> None:
    """Host RAM is the device: WARM <-> HOT must be a `reconfigure` (user_config) plus a replica
    count, never a replica restart (`args`, `ray_actor_options`, import path, runtime_env)."""
    options = RenderOptions(cpu_only=True, replica_num_cpus=0, replica_env=(("OMP_NUM_THREADS", "1"),))
    estimates = {"ml/warm": ESTIMATES["ml/warm"]}
    deployments = {"ml/warm": DEPLOYMENTS["ml/warm"]}

    def app(level: Level) -> dict[str, object]:
        plan = Plan(decisions=(decision("ml/warm", level, replicas=2, gpus=0.5),))
        config = render_serve_config(plan, deployments, options=options, estimates=estimates)
        return dict(next(a for a in config["applications"] if a["name"] == "md-ml-warm"))

    warm, hot = app(Level.WARM), app(Level.HOT)
    lightweight = {"user_config", "num_replicas", "autoscaling_config"}
    (warm_deployment,), (hot_deployment,) = warm.pop("deployments"), hot.pop("deployments")  # type: ignore[misc]
    assert warm == hot  # import path, args, route: the same
    assert {k: v for k, v in warm_deployment.items() if k not in lightweight} == {
        k: v for k, v in hot_deployment.items() if k not in lightweight}
    assert warm_deployment["ray_actor_options"]["memory"] == 123_456  # the weights, at both levels
    assert (warm_deployment["user_config"]["level"], hot_deployment["user_config"]["level"]) == ("Warm", "Hot")


def test_autoscaling_stays_within_the_granted_replicas() -> None:
    deployments = {"ml/a": md("a", "org/A", replicas=2, autoscaling={"minReplicas": 1, "maxReplicas": 4})}
    plan = Plan(decisions=(decision("ml/a", Level.HOT, replicas=3),))
    (replica,) = render_serve_config(plan, deployments, options=UNPINNED)["applications"][1]["deployments"]
    assert "num_replicas" not in replica
    assert replica["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "initial_replicas": 2,
                                             "target_ongoing_requests": 2}
    assert validate_serve_config(render_serve_config(plan, deployments, options=UNPINNED)) == []


def test_a_decision_without_its_deployment_is_an_error() -> None:
    with pytest.raises(KeyError, match="ml/ghost"):
        render_serve_config(Plan(decisions=(decision("ml/ghost", Level.HOT),)), DEPLOYMENTS)


def test_schema_rejects_what_serve_would_misread() -> None:
    config = render_serve_config(PLAN, DEPLOYMENTS, estimates=ESTIMATES)
    config["applications"][1]["deployments"][0]["ray_actor_options"]["num_gpu"] = 1  # typo
    config["applications"][2]["deployments"][0]["num_replicas"] = [1]
    config["applications"].append(dict(config["applications"][0]))
    errors = validate_serve_config(config)
    assert any("num_gpu" in e for e in errors)
    assert any("num_replicas" in e for e in errors)
    assert any("duplicate application name 'gateway'" in e for e in errors)
    with pytest.raises(ServeConfigInvalid):
        check_serve_config(config)


@pytest.mark.slow
def test_committed_serve_schema_matches_installed_ray() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "export_serve_schema.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_rendered_config_parses_with_ray_serve_itself() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = render_serve_config(PLAN, DEPLOYMENTS, estimates=ESTIMATES, options=RenderOptions(http_port=8000))
    parsed = ServeDeploySchema.model_validate(json.loads(serve_config_text(config)))
    assert [app.name for app in parsed.applications] == [a["name"] for a in config["applications"]]


def test_fractional_tensor_parallel_replica_gets_one_bundle_per_rank() -> None:
    # 4 ranks at 0.6 of a GPU each: Ray refuses num_gpus 2.4, so the replica asks for one rank's
    # share and a STRICT_PACK placement group reserves one bundle per rank on one node.
    tp = Decision(
        key="ml/llama", level=Level.HOT, replicas=1, gpus_per_replica=2.4, gpu_fraction=0.6, worker_group="gpu",
        assignments=(ReplicaPlacement(pod=0, gpus=(0, 1, 2, 3), fraction=0.6),), reason=Reason.PLACED_HOT,
        message="",
    )
    config = render_serve_config(Plan(decisions=(tp,)), {"ml/llama": DEPLOYMENTS["ml/llama"]},
                                 options=RenderOptions(hot_host_memory_bytes=2**30, pin_gpus=False))
    check_serve_config(config)
    app = next(a for a in config["applications"] if a["name"] == model_app_name("ml", "llama"))
    deployment = app["deployments"][0]
    assert deployment["ray_actor_options"]["num_gpus"] == 0.6
    assert deployment["placement_group_strategy"] == "STRICT_PACK"
    assert deployment["placement_group_bundles"] == (
        [{"CPU": 1, "GPU": 0.6, "memory": 2**30}] + [{"CPU": 1, "GPU": 0.6}] * 3
    )
    args = ModelAppArgs.model_validate(app["args"])
    assert args.tensor_parallel_size == 4 and args.gpu_fraction == 0.6 and args.gpus_per_replica == 2.4


def test_single_gpu_replica_has_no_placement_group() -> None:
    config = render_serve_config(PLAN, DEPLOYMENTS)
    apps = {a["name"]: a["deployments"][0] for a in config["applications"]}
    for name in (GATEWAY_APP, "md-ml-gpt2", "md-ml-warm"):
        assert "placement_group_bundles" not in apps[name]
        assert "placement_group_strategy" not in apps[name]


@pytest.mark.parametrize("options", [UNPINNED, RenderOptions(), RenderOptions(cpu_only=True, gateway_num_cpus=0)])
def test_the_gateway_is_pinned_to_the_head_node_and_no_model_replica_is(options: RenderOptions) -> None:
    """The gateway asks for a sliver of Ray's head-node resource, so it runs where the chart mounts
    the credentials it needs (results bucket, InfluxDB) and never on a worker pod."""
    config = render_serve_config(PLAN, DEPLOYMENTS, estimates=ESTIMATES, options=options)
    apps = {app["name"]: app for app in config["applications"]}
    (gateway,) = apps.pop(GATEWAY_APP)["deployments"]
    assert gateway["ray_actor_options"]["resources"] == {"node:__internal_head__": 0.001}
    for app in apps.values():
        for deployment in app["deployments"]:
            asked = [deployment["ray_actor_options"], *deployment.get("placement_group_bundles", [])]
            assert not any(name.startswith("node:") for options in asked for name in options.get("resources", options))
    assert validate_serve_config(config) == []

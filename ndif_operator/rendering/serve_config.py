"""Plan + ModelDeployments → a Ray Serve multi-application config (a plain dict). Pure.

One gateway application (the nnsight ingress, route `/`, pinned to Ray's head node) and one
application per HOT or WARM model, named by `model_app_name`; COLD models get no application.
What goes where follows what restarts replicas: model identity and placement are
`args` / `ray_actor_options` (a change reloads the model anyway), the request limits and the level
are `user_config` (applied in place by `reconfigure`), and replica counts are lightweight.

The gateway's routing table (every ModelDeployment with its granted level, COLD ones included so
that they answer a clear "COLD" instead of "not deployed") is the gateway's `user_config`: adding
or removing a model never restarts the gateway, which keeps its sessions and jobs in memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ndif_operator.api import (
    Estimate,
    GatewayAppArgs,
    GatewayRoute,
    GatewayUserConfig,
    Level,
    ModelAppArgs,
    ModelDeployment,
    ModelUserConfig,
)
from ndif_operator.api.naming import (
    GATEWAY_APP,
    GATEWAY_DEPLOYMENT,
    GATEWAY_IMPORT_PATH,
    MODEL_DEPLOYMENT,
    MODEL_IMPORT_PATH,
    model_app_name,
    model_key,
)
from ndif_operator.api.pinning import HEAD_NODE_RESOURCE, HEAD_NODE_SHARE
from ndif_operator.planning import Decision, Plan
from ndif_operator.rendering.options import RenderOptions
from ndif_operator.rendering.pinned import actor_options, leased_slot, pinned_slot, slot_app_name, slot_scaling
from ndif_operator.rendering.text import canonical_number

ServeConfig = dict[str, Any]

# What Serve 2.60 gives a replica actor whose `num_cpus` is unset (ReplicaConfig's default).
SERVE_DEFAULT_REPLICA_CPUS = 1.0
# A rank of a CPU-only tensor-parallel replica with no CPU reserved: Ray refuses empty bundles.
MIN_RANK_CPU = 0.01
# Environment every model replica gets whatever the options say. Model apps are reached only through
# the gateway's handles (route_prefix None), so they never serve HTTP themselves: with Serve's direct
# ingress on (the gateway's own HTTP server) a model replica would otherwise start one too, on a
# uvloop whose io_uring rings abort the process once the replica's process filter refuses io_uring.
# For the same reason a model replica's event loops are asyncio's own, not uvloop: the gateway's
# direct channel is a TCP server on the replica's user-code loop (model_runtime/replica/channel.py),
# and uvloop registers each new socket through an io_uring ring, which aborts a confined process.
MODEL_REPLICA_ENV: Mapping[str, str] = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0", "RAY_USE_UVLOOP": "0"}


def render_serve_config(
    plan: Plan,
    deployments: Mapping[str, ModelDeployment],
    *,
    options: RenderOptions | None = None,
    estimates: Mapping[str, Estimate] | None = None,
) -> ServeConfig:
    """The Serve config for `plan`.

    `deployments` maps `namespace/name` to the object; every decision's key must be there.
    `estimates` (default: each deployment's `status.estimate`) sizes WARM copies' CPU memory.
    Deterministic: the same inputs give an equal dict, and `serve_config_text` an equal string.
    """
    options = options or RenderOptions()
    routes: dict[str, GatewayRoute] = {}
    applications: list[dict[str, Any]] = []
    # Served models first: a COLD deployment of the same repo id must not shadow a served one.
    ordered = sorted(plan.decisions, key=lambda d: (d.level == Level.COLD, d.key))
    for decision in ordered:
        deployment = deployments.get(decision.key)
        if deployment is None:
            if decision.level == Level.COLD:
                continue  # nothing to serve and nothing to describe
            raise KeyError(f"the plan places {decision.key!r} but no such ModelDeployment was given")
        key = model_key(deployment.spec.model.repo_id)
        if key in routes:
            # Two deployments of one repo id would make the gateway ambiguous; the first by key wins.
            continue
        apps: list[dict[str, Any]] = []
        if decision.level != Level.COLD:
            estimate = (estimates or {}).get(decision.key) or (
                deployment.status.estimate if deployment.status else None
            )
            apps = _model_apps(decision, deployment, estimate, options)
            applications.extend(apps)
        routes[key] = GatewayRoute(
            deployment=decision.key,
            level=Level(decision.level),
            app=apps[0]["name"] if apps else None,
            apps=[str(app["name"]) for app in apps],
            repo_id=deployment.spec.model.repo_id,
            revision=deployment.spec.model.revision,
            activate_on_request=deployment.spec.activate_on_request,
        )
    gateway = _gateway_app(options, routes)
    config: ServeConfig = {"applications": [gateway, *sorted(applications, key=lambda a: str(a["name"]))]}
    if options.log_encoding is not None:
        config["logging_config"] = {"encoding": options.log_encoding}
    if options.http_host is not None or options.http_port is not None:
        http: dict[str, Any] = {}
        if options.http_host is not None:
            http["host"] = options.http_host
        if options.http_port is not None:
            http["port"] = options.http_port
        config["http_options"] = http
    return config


def _rank_bundles(ranks: int, gpus: float, cpus: float, memory: int) -> list[dict[str, Any]]:
    """One bundle per rank (bundle i holds rank i); the first also holds the replica actor's memory.

    Every bundle names the CPU its rank asks for, so that the replica actor (rank 0, which Serve
    places in bundle 0 and, unless told otherwise, gives `num_cpus: 1`) and each shard actor fit
    their bundle. A bundle must ask for something: a CPU-only rank with no CPU reserved asks for
    `MIN_RANK_CPU`.
    """
    rank: dict[str, Any] = {"CPU": canonical_number(cpus if cpus > 0 or gpus > 0 else MIN_RANK_CPU)}
    if gpus > 0:
        rank["GPU"] = canonical_number(gpus)
    first = {**rank, "memory": memory} if memory > 0 else dict(rank)
    return [first, *(dict(rank) for _ in range(ranks - 1))]


def _gateway_app(options: RenderOptions, routes: Mapping[str, GatewayRoute]) -> dict[str, Any]:
    # The deprecated static `models` stays out of args: any change there would restart the gateway.
    args = GatewayAppArgs.model_validate(options.gateway.model_dump()).model_dump(mode="json", exclude={"models"})
    table = GatewayUserConfig(models=dict(sorted(routes.items())))
    return {
        "name": GATEWAY_APP,
        "route_prefix": "/",
        "import_path": GATEWAY_IMPORT_PATH,
        "args": args,
        "deployments": [
            {
                "name": GATEWAY_DEPLOYMENT,
                "num_replicas": options.gateway_replicas,
                # On the head node, the one Ray pod given the gateway's credentials (docs/security.md).
                "ray_actor_options": {**actor_options(options.gateway_num_cpus or 0, 0, 0, {}),
                                      "resources": {HEAD_NODE_RESOURCE: HEAD_NODE_SHARE}},
                "user_config": table.model_dump(mode="json"),
            }
        ],
    }


def _model_apps(
    decision: Decision, deployment: ModelDeployment, estimate: Estimate | None, options: RenderOptions
) -> list[dict[str, Any]]:
    """The applications of one HOT or WARM model: one per pinned replica slot, else one."""
    spec = deployment.spec
    hot = decision.level == Level.HOT
    gpus = decision.gpus_per_replica if hot and not options.cpu_only else 0.0
    # CPU-only clusters run tensor parallelism too (gloo): the ranks are processes either way.
    ranks = max(1, decision.tensor_parallel_size) if hot else 1
    pinned = options.pin_gpus and not options.cpu_only and decision.worker_group is not None
    # A pinned single-GPU replica leases its GPU share when HOT (user_config), so that its args and
    # options are those of its WARM copy: the level change is a `reconfigure` (docs/runtime.md).
    leased = pinned and hot and ranks == 1 and gpus > 0 and bool(decision.assignments)
    args = ModelAppArgs(
        model_key=model_key(spec.model.repo_id),
        deployment=decision.key,
        repo_id=spec.model.repo_id,
        revision=spec.model.revision,
        source=spec.model.source,
        dtype=spec.model.dtype,
        trust_remote_code=spec.model.trust_remote_code,
        tensor_parallel_size=max(1, decision.tensor_parallel_size) if hot else 1,
        gpus_per_replica=0.0 if leased else gpus,
        gpu_fraction=decision.gpu_fraction if gpus > 0 and not leased else 0.0,
    )
    weights = estimate.weights_bytes if estimate is not None else 0
    if options.cpu_only:
        # Host RAM is the device: a HOT replica holds the weights in its own memory, and a WARM one
        # reserves the same, so WARM <-> HOT renders equal `ray_actor_options` and `args` and Serve
        # applies the level change in place (`reconfigure`), keeping the process (docs/runtime.md).
        memory = weights
    elif hot or pinned:
        # A pinned WARM replica asks for what its HOT render asks (the level change is in place):
        # its host copy lives in the node's object store (the weight store), sized per node.
        memory = options.hot_host_memory_bytes
    else:
        # A WARM copy holds the weights in CPU RAM: reserve them so Ray does not overcommit a pod.
        memory = weights
    user_config = ModelUserConfig.from_limits(spec.limits, Level(decision.level),
                                              activate_on_request=spec.activate_on_request)
    num_cpus = options.replica_num_cpus
    if ranks > 1 and num_cpus is None:
        num_cpus = SERVE_DEFAULT_REPLICA_CPUS  # said explicitly: bundle 0 must hold what Serve gives rank 0
    base = model_app_name(*decision.key.split("/", 1))

    def app(name: str, model_deployment: dict[str, Any], gpu_lease: dict[str, float] | None = None) -> dict[str, Any]:
        model_deployment["user_config"] = user_config.model_copy(
            update={"gpu_lease": gpu_lease or {}}).model_dump(mode="json")
        return {
            "name": name,
            "route_prefix": None,  # reached through the gateway's handles, never over HTTP directly
            "import_path": MODEL_IMPORT_PATH,
            "args": args.model_dump(mode="json"),
            "deployments": [model_deployment],
        }

    env = {**MODEL_REPLICA_ENV, **dict(options.replica_env)}
    if pinned and decision.assignments and (gpus > 0 or not hot):
        group = decision.worker_group
        assert group is not None
        slots = [leased_slot(a.group or group, a, a.fraction, num_cpus, memory, env) if leased
                 else (pinned_slot(a.group or group, a, a.fraction, num_cpus, memory, env), None)
                 for a in decision.assignments]
        scaling = slot_scaling(spec, len(slots)) if hot else [{"num_replicas": 1}] * len(slots)
        return [app(slot_app_name(base, n), {"name": MODEL_DEPLOYMENT, **slot, **scale}, lease)
                for n, ((slot, lease), scale) in enumerate(zip(slots, scaling, strict=True))]
    model_deployment: dict[str, Any] = {"name": MODEL_DEPLOYMENT}
    # A tensor-parallel replica holds `gpu_fraction` of each of its `ranks` GPUs. Ray refuses a
    # fractional `num_gpus` above 1, so the replica actor (rank 0) asks for one share and the
    # placement group reserves one bundle per rank on one node (STRICT_PACK). The planner keeps
    # each share above half a GPU, so no two bundles of a replica can land on the same GPU.
    rank_gpus = (decision.gpu_fraction if gpus > 0 else 0.0) if ranks > 1 else gpus
    model_deployment["ray_actor_options"] = actor_options(num_cpus, rank_gpus, memory, env)
    if ranks > 1:
        model_deployment["placement_group_bundles"] = _rank_bundles(ranks, rank_gpus, num_cpus or 0.0, memory)
        model_deployment["placement_group_strategy"] = "STRICT_PACK"
    replicas = decision.replicas if hot else 1  # one process holds the WARM copy
    autoscaling = spec.autoscaling
    if hot and autoscaling is not None and replicas > 0:
        # The planner reserved room for `replicas`; autoscaling may move below it, never above.
        minimum = min(autoscaling.min_replicas, replicas)
        model_deployment["autoscaling_config"] = {
            "min_replicas": minimum,
            "max_replicas": replicas,
            "initial_replicas": max(minimum, min(spec.replicas, replicas)),
            "target_ongoing_requests": canonical_number(autoscaling.target_ongoing_requests),
        }
    else:
        model_deployment["num_replicas"] = replicas
    return [app(base, model_deployment)]

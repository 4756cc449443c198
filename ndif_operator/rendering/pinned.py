"""Pinned replica slots: each replica (and each tensor-parallel rank) on the pod and GPU the
planner chose, enforced by Ray through per-GPU custom resources and a pod label (api/pinning.py).

Serve's `ray_actor_options` belong to a deployment, not to a replica, so replicas of one model on
different GPUs are one application per slot (`<app>`, `<app>_r1`, `<app>_r2`, ...); the gateway
routes across them. A slot whose placement is unchanged keeps its exact config, so Serve leaves
its replica alone when another slot moves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ndif_operator.api import ModelDeploymentSpec
from ndif_operator.api.pinning import POD_LABEL, gpu_resource, pod_label_value
from ndif_operator.planning import ReplicaPlacement
from ndif_operator.rendering.text import canonical_number

# Serve's default `num_cpus` for a replica actor when the config leaves it out.
_SERVE_DEFAULT_REPLICA_CPUS = 1.0


def slot_app_name(base: str, slot: int) -> str:
    """Application of replica slot `slot`; `_` never occurs in `model_app_name`, so no clash."""
    return base if slot == 0 else f"{base}_r{slot}"


def slot_app_names(base: str, apps: list[str]) -> list[str]:
    """The names among `apps` that are slots of the model whose first application is `base`."""
    return [a for a in apps if a == base or (a.startswith(f"{base}_r") and a[len(base) + 2:].isdigit())]


def actor_options(num_cpus: float | None, num_gpus: float, memory: int, env: Mapping[str, str]) -> dict[str, Any]:
    """`ray_actor_options` of a replica: GPUs, then CPUs/memory/env only when set."""
    options: dict[str, Any] = {"num_gpus": canonical_number(num_gpus)}
    if num_cpus is not None:
        options["num_cpus"] = canonical_number(num_cpus)
    if memory > 0:
        options["memory"] = memory
    if env:
        options["runtime_env"] = {"env_vars": dict(sorted(env.items()))}
    return options


def pinned_slot(group: str, where: ReplicaPlacement, fraction: float, num_cpus: float | None, memory: int,
                env: Mapping[str, str]) -> dict[str, Any]:
    """The deployment fields (options, bundles) that put one replica exactly at `where`.

    `where.gpus` empty: a WARM copy, pinned to its pod's CPU RAM only.
    """
    selector = {POD_LABEL: pod_label_value(group, where.pod)}
    share = canonical_number(fraction)
    options = actor_options(num_cpus, 0, memory, env)
    if where.gpus:
        options["resources"] = {gpu_resource(where.gpus[0]): share}
    if len(where.gpus) <= 1:
        return {"ray_actor_options": {**options, "label_selector": selector}}
    # Tensor parallel: rank r in bundle r on GPU gpus[r], each bundle with the CPU its rank asks
    # for; bundle 0 also holds the replica actor (rank 0) itself, memory included, or Ray refuses
    # to schedule it there. `num_cpus` None is Serve's default of one CPU.
    cpus = _SERVE_DEFAULT_REPLICA_CPUS if num_cpus is None else num_cpus
    def bundle(gpu: int) -> dict[str, Any]:
        return {gpu_resource(gpu): share, **({"CPU": canonical_number(cpus)} if cpus else {})}

    first = {**bundle(where.gpus[0]), **({"memory": memory} if memory > 0 else {})}
    bundles = [first, *(bundle(gpu) for gpu in where.gpus[1:])]
    return {
        "ray_actor_options": options,
        "placement_group_bundles": bundles,
        "placement_group_bundle_label_selector": [dict(selector) for _ in bundles],
        "placement_group_strategy": "STRICT_PACK",
    }


def leased_slot(group: str, where: ReplicaPlacement, fraction: float, num_cpus: float | None, memory: int,
                env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, float]]:
    """A single-GPU replica slot whose GPU share the replica leases itself when it becomes HOT.

    The deployment fields are exactly those of a WARM copy on the same pod (no GPU resource), and
    the share goes to `ModelUserConfig.gpu_lease` (`{ndif_gpu_<i>: share}`), which the replica
    holds with a placement group on its node (model_runtime/replica/gpu_lease.py). WARM <-> HOT on one pod
    is then a `reconfigure`: Serve keeps the replica process.
    """
    (gpu,) = where.gpus
    slot = pinned_slot(group, replace(where, gpus=()), 0.0, num_cpus, memory, env)
    return slot, {gpu_resource(gpu): canonical_number(fraction)}


def slot_scaling(spec: ModelDeploymentSpec, slots: int) -> list[dict[str, Any]]:
    """Replica counts per slot: one each, or with autoscaling, slots past `minReplicas` scale 0..1.

    The planner reserved every slot (up to `maxReplicas`), so a slot that scales up always fits;
    the gateway sends a request to an idle slot when the running ones are busy, which is the demand
    Serve's autoscaler acts on.
    """
    auto = spec.autoscaling
    if auto is None:
        return [{"num_replicas": 1} for _ in range(slots)]
    minimum = min(auto.min_replicas, slots)
    initial = max(minimum, min(spec.replicas, slots))
    result: list[dict[str, Any]] = []
    for slot in range(slots):
        if slot < minimum:
            result.append({"num_replicas": 1})
            continue
        result.append({"autoscaling_config": {
            "min_replicas": 0,
            "max_replicas": 1,
            "initial_replicas": 1 if slot < initial else 0,
            "target_ongoing_requests": canonical_number(auto.target_ongoing_requests),
        }})
    return result

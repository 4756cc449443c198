"""GPU pinning vocabulary the renderer, the node declarations and the runtime must agree on.

Every Ray node that hosts model replicas declares:
- one custom resource per GPU, `ndif_gpu_<i>: 1` (i = the GPU's index in the pod, 0-based), and
- a node label `ndif.dev/pod: <worker group>-<pod index>` naming the planner's pod.

A pinned replica asks for `num_gpus: 0`, `resources: {ndif_gpu_<i>: <its share>}` and (outside a
placement group) `label_selector: {ndif.dev/pod: <group>-<pod>}`; a tensor-parallel replica puts
one `ndif_gpu_<j>: <share>` in each rank's bundle and selects the pod per bundle. Ray then has
exactly one place where each request fits, the planner's, whatever the arrival order. The
replica process binds itself to GPU i (`model_runtime.replica.gpu_binding`), since Ray only sets
CUDA_VISIBLE_DEVICES for `num_gpus` grants. docs/placement.md "Pinning" has the why.
"""

from __future__ import annotations

import json
import re

POD_LABEL = "ndif.dev/pod"
# Ray gives the head node this resource (1 unit, ray._common.constants.HEAD_NODE_RESOURCE_NAME):
# asking for a sliver of it is how Ray's own singletons stay on the head. The gateway does, so that
# the credentials it needs (results bucket, InfluxDB) are mounted on the head pod only.
HEAD_NODE_RESOURCE = "node:__internal_head__"
HEAD_NODE_SHARE = 0.001
GPU_RESOURCE_PREFIX = "ndif_gpu_"
# Inside a placement group Ray renames a bundle's resources `<name>_group_<pg id>` and
# `<name>_group_<bundle index>_<pg id>`; both still start with the declared name.
_PINNED = re.compile(rf"^{GPU_RESOURCE_PREFIX}(\d+)(?:_group_[0-9a-f_]+)?$")
_MAX_LABEL_VALUE = 63


def gpu_resource(index: int) -> str:
    """The custom resource of GPU `index` of a pod."""
    if index < 0:
        raise ValueError(f"GPU index must be >= 0, got {index}")
    return f"{GPU_RESOURCE_PREFIX}{index}"


def pod_label_value(group: str, pod: int) -> str:
    """The `ndif.dev/pod` label value of pod `pod` of worker group `group` (a Kubernetes label value)."""
    value = f"{group}-{pod}"
    if len(value) > _MAX_LABEL_VALUE or not re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", value):
        raise ValueError(f"worker group {group!r}: {value!r} is not a valid node label value "
                         f"(at most {_MAX_LABEL_VALUE} characters of [-A-Za-z0-9_.])")
    return value


def node_resources(gpus_per_pod: int) -> dict[str, int]:
    """The custom resources a node with `gpus_per_pod` GPUs declares (`ray start --resources`)."""
    return {gpu_resource(i): 1 for i in range(gpus_per_pod)}


def node_labels(group: str, pod: int) -> dict[str, str]:
    """The node labels of pod `pod` of `group` (`ray start --labels`)."""
    return {POD_LABEL: pod_label_value(group, pod)}


def pinned_gpu_index(resources: dict[str, float] | None) -> int | None:
    """The GPU index a process was granted through its pinned resource, or None if not pinned."""
    found = {int(m.group(1)) for name, amount in (resources or {}).items()
             if amount > 0 and (m := _PINNED.match(name))}
    if len(found) > 1:
        raise ValueError(f"a process holds several pinned GPUs {sorted(found)}; each rank pins one")
    return found.pop() if found else None


# KubeRay gives each worker pod its index in the group as this pod label (RayMultiHostIndexing).
# What a HOT replica's error says when its planned GPU share did not come free on its node (the
# runtime raises it; the operator finds it in Serve's messages and reports ReplicasUnschedulable).
GPU_LEASE_UNAVAILABLE = "GPU share not free on this node"
KUBERAY_REPLICA_INDEX_LABEL = "ray.io/worker-group-replica-index"
POD_INDEX_ENV = "NDIF_POD_INDEX"


def kuberay_ray_start_params(group: str, gpus_per_pod: int) -> dict[str, str]:
    """`rayStartParams` of a KubeRay worker group whose replicas can be pinned.

    The pod index comes from the container env `NDIF_POD_INDEX` (downward API of the pod label
    `ray.io/worker-group-replica-index`); KubeRay runs `ray start` through a shell, which expands it.
    """
    resources = json.dumps(node_resources(gpus_per_pod), separators=(",", ":"))
    escaped = resources.replace('"', '\\"')
    # KubeRay's documented form for JSON in rayStartParams: double-quoted, inner quotes escaped.
    return {"resources": f'"{escaped}"', "labels": f"{POD_LABEL}={group}-${POD_INDEX_ENV}"}


def declares_pinning(ray_start_params: dict[str, object], gpus_per_pod: int) -> bool:
    """Whether a worker group's rayStartParams (or KubeRay's top-level `resources`) declare what
    pinned replicas ask for: every `ndif_gpu_<i>` and the pod label."""
    text = " ".join(str(v) for v in ray_start_params.values())
    return POD_LABEL in text and all(gpu_resource(i) in text for i in range(gpus_per_pod))

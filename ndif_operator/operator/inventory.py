"""Read the planner's inventory from a RayService's worker groups (and Nodes). Pure.

Per worker group:
- pods: `replicas` (KubeRay's desired count; `maxReplicas` when the in-tree autoscaler is on and
  the group may grow, since Serve demand is what scales it);
- GPUs per pod: the Ray container's `nvidia.com/gpu` limit (KubeRay advertises the same to Ray);
- GPU memory per GPU, first match wins: the group template annotation `ndif.dev/gpu-memory`
  (a quantity, e.g. "80Gi"); the GPU Feature Discovery label `nvidia.com/gpu.memory` (MiB) in the
  template's nodeSelector; the same label on a Node that matches the nodeSelector;
- CPU memory for WARM copies: annotation `ndif.dev/warm-memory`, else the container memory limit
  minus `ndif.dev/reserved-memory` (default 4Gi) for the runtime itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ndif_operator.api.pinning import POD_LABEL, declares_pinning, gpu_resource
from ndif_operator.operator.quantity import memory_bytes, quantity_bytes
from ndif_operator.planning import Inventory, WorkerGroup

GPU_RESOURCE = "nvidia.com/gpu"
GPU_MEMORY_ANNOTATION = "ndif.dev/gpu-memory"
WARM_MEMORY_ANNOTATION = "ndif.dev/warm-memory"
RESERVED_MEMORY_ANNOTATION = "ndif.dev/reserved-memory"
GFD_MEMORY_LABEL = "nvidia.com/gpu.memory"  # MiB, set by NVIDIA GPU Feature Discovery
DEFAULT_RESERVED_BYTES = 4 * 2**30


class InventoryError(ValueError):
    """The RayService does not describe its worker groups well enough to plan on."""


@dataclass(frozen=True, slots=True)
class InventoryReading:
    inventory: Inventory
    warnings: tuple[str, ...] = ()


def _ray_container(template: Mapping[str, Any]) -> Mapping[str, Any]:
    containers = (template.get("spec") or {}).get("containers") or []
    if not containers:
        return {}
    # KubeRay treats the first container as the Ray container.
    first: Mapping[str, Any] = containers[0]
    return first


def _limit(container: Mapping[str, Any], name: str) -> str | None:
    resources = container.get("resources") or {}
    value = (resources.get("limits") or {}).get(name) or (resources.get("requests") or {}).get(name)
    return None if value is None else str(value)


def _node_matches(node: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    labels = (node.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _gpu_memory(group: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]]) -> int | None:
    template = group.get("template") or {}
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    if GPU_MEMORY_ANNOTATION in annotations:
        return memory_bytes(annotations[GPU_MEMORY_ANNOTATION], f"annotation {GPU_MEMORY_ANNOTATION}")
    selector: Mapping[str, str] = (template.get("spec") or {}).get("nodeSelector") or {}
    if GFD_MEMORY_LABEL in selector:
        return int(selector[GFD_MEMORY_LABEL]) * 2**20
    sizes = sorted(
        int(labels[GFD_MEMORY_LABEL]) * 2**20
        for node in nodes
        if _node_matches(node, selector)
        and GFD_MEMORY_LABEL in (labels := (node.get("metadata") or {}).get("labels") or {})
    )
    return sizes[0] if sizes else None  # the smallest matching node is what every pod can count on


def read_worker_group(group: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]], *,
                      autoscaling: bool) -> tuple[WorkerGroup, list[str]]:
    name = str(group.get("groupName") or "")
    if not name:
        raise InventoryError("a worker group has no groupName")
    warnings: list[str] = []
    pods = int(group.get("replicas") or 0)
    if autoscaling and group.get("maxReplicas") is not None:
        pods = max(pods, int(group["maxReplicas"]))
    pods *= max(1, int(group.get("numOfHosts") or 1))
    template = group.get("template") or {}
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    container = _ray_container(template)
    gpu_limit = _limit(container, GPU_RESOURCE)
    gpus = int(quantity_bytes(gpu_limit)) if gpu_limit else 0
    gpu_memory = 0
    if gpus:
        found = _gpu_memory(group, nodes)
        if found is None:
            warnings.append(f"worker group {name!r} has {gpus} GPUs per pod but no GPU memory: set the "
                            f"{GPU_MEMORY_ANNOTATION} annotation or the {GFD_MEMORY_LABEL} label; ignored")
            gpus = 0
        else:
            gpu_memory = found
            declared = {**(group.get("rayStartParams") or {}), "resources_api": group.get("resources") or "",
                        "labels_api": group.get("labels") or ""}
            if not declares_pinning(declared, gpus):
                warnings.append(f"worker group {name!r} does not declare the pinning resources "
                                f"({gpu_resource(0)}..{gpu_resource(gpus - 1)}) and the {POD_LABEL} label: "
                                "pinned replicas cannot start there (docs/placement.md \"Pinning\")")
    if WARM_MEMORY_ANNOTATION in annotations:
        cpu_memory = memory_bytes(annotations[WARM_MEMORY_ANNOTATION], f"annotation {WARM_MEMORY_ANNOTATION}")
    else:
        memory = _limit(container, "memory")
        reserved = (memory_bytes(annotations[RESERVED_MEMORY_ANNOTATION], f"annotation {RESERVED_MEMORY_ANNOTATION}")
                    if RESERVED_MEMORY_ANNOTATION in annotations else DEFAULT_RESERVED_BYTES)
        cpu_memory = max(0, quantity_bytes(memory) - reserved) if memory else 0
    return WorkerGroup(name=name, pods=pods, gpus_per_pod=gpus, gpu_memory_bytes=gpu_memory,
                       cpu_memory_bytes=cpu_memory), warnings


def read_inventory(ray_service: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]] = ()) -> InventoryReading:
    """The worker groups of `ray_service` as planner input; warnings name what was ignored."""
    cluster = (ray_service.get("spec") or {}).get("rayClusterConfig") or {}
    autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
    groups: list[WorkerGroup] = []
    warnings: list[str] = []
    for group in cluster.get("workerGroupSpecs") or []:
        try:
            worker_group, group_warnings = read_worker_group(group, nodes, autoscaling=autoscaling)
        except (ValueError, TypeError) as exc:
            warnings.append(f"worker group {group.get('groupName')!r} ignored: {exc}")
            continue
        groups.append(worker_group)
        warnings.extend(group_warnings)
    return InventoryReading(Inventory(groups=tuple(sorted(groups, key=lambda g: g.name))), tuple(warnings))

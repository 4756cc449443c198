"""A HOT replica's GPU share, held by a placement group on the replica's node, not by the replica.

Ray Serve restarts a replica for any `ray_actor_options` change, and a WARM model must not hold
its GPU. So a pinned single-GPU replica asks Ray for no GPU itself (its options are the same at
WARM and HOT) and, when `reconfigure` makes it HOT, reserves its share of the planned GPU
(`ModelUserConfig.gpu_lease`, `{ndif_gpu_<i>: share}`) with a one-bundle placement group on its
own node; going WARM removes the group. Ray's accounting is what the plan says either way, and
the replica process, its imports and its model skeleton survive the level change.

The group is created by the replica, so Ray removes it when the replica dies. Waiting uses the
GCS (`PlacementGroup.wait`), so no worker process is started for it. The group's name carries
the model, node and start of the wait (`gpu_waits.group_name`): while it is pending, the gateway
reads from the placement group table that the model waits for a GPU and which models hold it,
and says so in its 503s and `/status` (from which the operator sets the Ready condition).
"""

from __future__ import annotations

import time
from typing import Any

from model_runtime.gpu_waits import LEASE_TIMEOUT_S, group_name
from ndif_operator.api.pinning import GPU_LEASE_UNAVAILABLE, pinned_gpu_index


class GpuLeaseTimeout(RuntimeError):
    """The planned GPU share did not become free on this node in time."""


class GpuLease:
    """The placement group holding `resources` on this replica's node, ready when constructed."""

    def __init__(self, resources: dict[str, float], *, model: str = "", timeout_s: float = LEASE_TIMEOUT_S) -> None:
        import ray
        from ray.util.placement_group import placement_group

        self.resources = dict(resources)
        self.gpu_index = pinned_gpu_index(self.resources)
        node = ray.get_runtime_context().get_node_id()
        self._group: Any = placement_group([self.resources], strategy="STRICT_PACK",
                                           bundle_label_selector=[{_NODE_ID_LABEL: node}],
                                           name=group_name(model, node, time.time(), timeout_s))
        if not self._group.wait(timeout_seconds=timeout_s):
            self.release()
            raise GpuLeaseTimeout(f"{GPU_LEASE_UNAVAILABLE} after {timeout_s:.0f} s: {self.resources}")

    def release(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if self._group is not None:
            remove_placement_group(self._group)
            self._group = None


# Ray's built-in label of every node (ray._raylet.RAY_NODE_ID_KEY).
_NODE_ID_LABEL = "ray.io/node-id"


def bind_leased_gpu(lease: GpuLease) -> str:
    """The torch device of the leased GPU, its allocator capped to the leased share.

    `cuda:<i>`: a replica without a GPU grant sees all of its pod's GPUs (Ray sets no
    CUDA_VISIBLE_DEVICES for it), so index i is the pod's GPU i, as for `ndif_gpu_<i>`. "cpu" on a
    node without CUDA (CPU test clusters declaring `ndif_gpu_<i>`).
    """
    import torch

    if lease.gpu_index is None or not torch.cuda.is_available():
        return "cpu"
    torch.cuda.set_device(lease.gpu_index)
    share = max(lease.resources.values())
    if 0 < share < 1:
        torch.cuda.set_per_process_memory_fraction(share, device=lease.gpu_index)
    return f"cuda:{lease.gpu_index}"

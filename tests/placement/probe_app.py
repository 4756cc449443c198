"""A trivial Serve replica that stands in for a model: it starts its tensor-parallel ranks the way
the runtime does (one actor per extra bundle of its placement group, with that bundle's resources)
and records where each rank runs, in a JSON file per actor under $NDIF_PROBE_DIR.

Where: the node's `ndif.dev/pod` label; which GPU: the pinned `ndif_gpu_<i>` grant bound by
`model_runtime.replica.gpu_binding` (pinned), else the GPU ids Ray granted (`num_gpus`, unpinned).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from model_runtime.replica.gpu_binding import assigned_resources, bind_pinned_gpu, rank_actor_options
from model_runtime.replica.gpu_lease import GpuLease
from ndif_operator.api.naming import GATEWAY_DEPLOYMENT, MODEL_DEPLOYMENT
from ndif_operator.api.pinning import HEAD_NODE_RESOURCE, POD_LABEL

PROBE_DIR_ENV = "NDIF_PROBE_DIR"


def where_am_i() -> dict[str, Any]:
    context = ray.get_runtime_context()
    granted = assigned_resources()
    pinned = bind_pinned_gpu(granted)
    gpus = [int(g) for g in ray.get_gpu_ids()]
    # Inside a placement group Ray lists the bundle's renamed resources (`<name>_group_...`) only.
    share = max((v for k, v in granted.items() if k.startswith(("ndif_gpu_", "GPU"))), default=0.0)
    return {"pod": context.get_node_labels().get(POD_LABEL), "gpu": pinned if pinned is not None else
            (gpus[0] if gpus else None), "share": round(float(share), 4), "actor": context.get_actor_id()}


@ray.remote(num_cpus=0)
class Rank:
    def where(self) -> dict[str, Any]:
        return where_am_i()


@serve.deployment(name=MODEL_DEPLOYMENT)  # the name the rendered config configures
class Probe:
    def __init__(self, args: dict[str, Any]) -> None:
        self._deployment = args.get("deployment")
        self._lease: GpuLease | None = None
        self._base = where_am_i()  # rank 0 without a lease
        self._ranks = [self._base]
        self._actors: list[Any] = []
        group = ray.util.get_current_placement_group()
        if group is not None:
            for index, bundle in enumerate(group.bundle_specs[1:], start=1):
                actor = Rank.options(**rank_actor_options(bundle),  # type: ignore[arg-type]
                                     scheduling_strategy=PlacementGroupSchedulingStrategy(group, index)).remote()
                self._ranks.append(ray.get(actor.where.remote()))
                self._actors.append(actor)  # the ranks live as long as the replica
        # A single-GPU slot leases its GPU share at run time, as the replica does (replica/gpu_lease.py).
        self.reconfigure(serve.get_replica_context()._deployment_config.user_config or {})

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Take (or move, or give back) the GPU lease the rendered user_config asks for, as the
        replica does, and report where this replica now holds its GPU."""
        lease = dict(user_config.get("gpu_lease") or {})
        held = self._lease.resources if self._lease is not None else {}
        if held == lease and getattr(self, "_reported", False):
            return
        if self._lease is not None:
            self._lease.release()
        self._lease = GpuLease(lease) if lease else None
        self._ranks[0] = self._base if self._lease is None else {
            **self._base, "gpu": self._lease.gpu_index, "share": round(float(max(lease.values())), 4)}
        me = self._ranks[0]
        record = {"deployment": self._deployment, "actor": me["actor"], "ranks": self._ranks}
        out = Path(os.environ[PROBE_DIR_ENV]) / f"{me['actor']}.json"
        partial = out.with_suffix(".part")
        partial.write_text(json.dumps(record))
        partial.rename(out)  # atomic: the observer never reads half a report
        self._reported = True

    def __call__(self) -> str:
        return "ok"


def build_app(args: dict[str, Any]) -> serve.Application:
    return Probe.bind(args)  # type: ignore[attr-defined,no-any-return]


@serve.deployment(name=GATEWAY_DEPLOYMENT)  # stands in for the gateway: records whether it runs on the head
class GatewayProbe:
    def __init__(self, args: dict[str, Any]) -> None:
        context = ray.get_runtime_context()
        node = context.get_node_id()
        head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and HEAD_NODE_RESOURCE in n["Resources"])
        record = {"gateway": True, "on_head": node == head, "pod": context.get_node_labels().get(POD_LABEL)}
        out = Path(os.environ[PROBE_DIR_ENV]) / f"gateway-{context.get_actor_id()}.json"
        partial = out.with_suffix(".part")
        partial.write_text(json.dumps(record))
        partial.rename(out)

    def __call__(self) -> str:
        return "ok"


def build_gateway(args: dict[str, Any]) -> serve.Application:
    return GatewayProbe.bind(args)  # type: ignore[attr-defined,no-any-return]

"""Manifests → estimates → plan → Serve config, for this machine. Pure but for the evaluator's reads.

The very functions the operator calls (`evaluation.estimate`, `planning.plan`,
`rendering.render_serve_config`); local mode only chooses the inventory and the render options.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ndif_operator.api import Estimate, GatewayAppArgs, Level, ModelDeployment, ModelSpec
from ndif_operator.evaluation import (
    CacheEntry,
    EstimateCache,
    EstimateError,
    EstimatePending,
    estimate,
    estimate_from_entry,
)
from ndif_operator.local.inventory import LocalInventory
from ndif_operator.local.manifests import deployment_key
from ndif_operator.local.meta_device import run_meta_evaluator
from ndif_operator.planning import Plan, plan
from ndif_operator.planning.requests import placement_request
from ndif_operator.rendering import RenderOptions, check_serve_config, render_serve_config

# Environment of every model replica in local mode: 2 shared cores on small boxes, no model hub.
_LOCAL_REPLICA_ENV = (("OMP_NUM_THREADS", "1"), ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"))


@dataclass(frozen=True)
class LocalPlan:
    """Everything local mode decided, kept for the model table."""

    deployments: dict[str, ModelDeployment]  # by namespace/name
    estimates: dict[str, Estimate]
    estimate_errors: dict[str, str]  # why a deployment could not be sized (it is planned unsized)
    plan: Plan
    config: dict[str, Any]
    cpu_only: bool = False  # the planner's one "GPU" was this machine's RAM

    @property
    def expected_apps(self) -> set[str]:
        return {str(app["name"]) for app in self.config["applications"]}


MetaEvaluator = Callable[[ModelSpec, str], CacheEntry]


def evaluate_all(
    deployments: Sequence[ModelDeployment], cache: EstimateCache, *, now: datetime,
    meta_evaluator: MetaEvaluator = run_meta_evaluator,
) -> tuple[dict[str, Estimate], dict[str, str]]:
    """Size every deployment; a checkpoint without safetensors goes to the meta-device evaluator
    (a subprocess here, where the operator starts a Job). What cannot be sized is planned unsized."""
    estimates: dict[str, Estimate] = {}
    errors: dict[str, str] = {}
    for md in deployments:
        key = deployment_key(md)
        try:
            try:
                estimates[key] = estimate(md.spec.model, md.spec.limits, cache, now=now)
            except EstimatePending as pending:
                entry = meta_evaluator(md.spec.model, pending.cache_key)
                cache.put(entry)
                estimates[key] = estimate_from_entry(entry, md.spec.limits)
        except EstimateError as exc:
            errors[key] = str(exc)
    return estimates, errors


def _as_planned(md: ModelDeployment, hot: bool) -> ModelDeployment:
    if not hot:
        return md
    return md.model_copy(update={"spec": md.spec.model_copy(update={"level": Level.HOT})})


def render_options(local: LocalInventory, *, serve_port: int, gateway: GatewayAppArgs) -> RenderOptions:
    return RenderOptions(
        cpu_only=local.cpu_only,
        # One machine: CPU accounting only risks stuck rolling updates.
        replica_num_cpus=0,
        gateway_num_cpus=0,
        gateway=gateway,
        http_host="127.0.0.1",
        http_port=serve_port,
        replica_env=_LOCAL_REPLICA_ENV,
    )


def plan_local(
    deployments: Sequence[ModelDeployment],
    local: LocalInventory,
    *,
    serve_port: int,
    gateway: GatewayAppArgs | None = None,
    cache: EstimateCache | None = None,
    now: datetime | None = None,
    activated: frozenset[str] = frozenset(),
    sized: Mapping[str, Estimate] | None = None,
) -> LocalPlan:
    """`activated`: deployment keys made Hot on request (local/activation.py). `sized`: estimates
    already known by key (tests); the others are evaluated."""
    now = now or datetime.now(UTC)
    known = dict(sized or {})
    estimates, errors = evaluate_all([md for md in deployments if deployment_key(md) not in known],
                                     cache or EstimateCache(), now=now)
    estimates.update(known)
    requests = [placement_request(deployment_key(md), md, estimates.get(deployment_key(md)),
                                  hot=deployment_key(md) in activated) for md in deployments]
    the_plan = plan(local.inventory, requests, now=now)
    by_key = {deployment_key(md): _as_planned(md, deployment_key(md) in activated) for md in deployments}
    config = render_serve_config(
        the_plan,
        by_key,
        options=render_options(local, serve_port=serve_port, gateway=gateway or GatewayAppArgs()),
        estimates=estimates,
    )
    config["proxy_location"] = "HeadOnly"  # one node: one proxy, on loopback
    check_serve_config(config)
    return LocalPlan(by_key, estimates, errors, the_plan, config, cpu_only=local.cpu_only)

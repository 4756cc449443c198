"""Plan one RayService's models and patch its `spec.serveConfigV2` when the string differs.

Inventory from the RayService (and Nodes), one plan, one rendered and validated config, one merge
patch of `spec.serveConfigV2` alone; nothing when the string on the cluster is already the planned
one. When the string on the cluster is neither the planned one nor the last one this operator wrote
to that same RayService (same uid), someone else wrote it (e.g. `kubectl apply` of a manifest
carrying `serveConfigV2`): the planned config is restored and a Warning Event
`ServeConfigOverwritten` says so. A re-created RayService (new uid) is not an overwrite.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ndif_operator.operator import metrics
from ndif_operator.operator.entries import Entry
from ndif_operator.operator.inventory import read_inventory
from ndif_operator.operator.kube import KubeApi, KubeError
from ndif_operator.operator.ray_service import serve_config_text as current_serve_config
from ndif_operator.operator.recorder import EventRecorder
from ndif_operator.operator.requests import current_placement, placement_request
from ndif_operator.planning import Decision, Plan, plan
from ndif_operator.rendering import (
    RenderOptions,
    ServeConfigInvalid,
    check_serve_config,
    render_serve_config,
    serve_config_text,
)
from ndif_operator.scheduling import Schedule

logger = logging.getLogger("ndif_operator.serve_config_patch")

Target = tuple[str, str]
OVERWRITTEN = "ServeConfigOverwritten"


@dataclass(frozen=True, slots=True)
class _Written:
    uid: str
    text: str


@dataclass(frozen=True, slots=True)
class PatchResult:
    decisions: dict[str, Decision]
    error: str | None = None  # why the planned config is not on the RayService


class ServeConfigPatcher:
    def __init__(self, api: KubeApi, options: RenderOptions, recorder: EventRecorder) -> None:
        self.api = api
        self.options = options
        self.recorder = recorder
        self._written: dict[Target, _Written] = {}
        self.patches = 0

    async def plan_and_patch(self, target: Target, ray_service: dict[str, Any], live: list[Entry],
                             nodes: list[dict[str, Any]], now: datetime,
                             schedule: Schedule | None = None) -> PatchResult:
        namespace, name = target
        label = f"{namespace}/{name}"
        reading = read_inventory(ray_service, nodes)
        for warning in reading.warnings:
            logger.warning("RayService %s: %s", label, warning)
        deployments = {e.key: e.effective() for e in live if e.md is not None}
        requests = []
        for entry in live:
            annotations = entry.obj["metadata"].get("annotations") or {}
            current = current_placement(entry.status, annotations)
            requests.append(placement_request(entry.key, deployments[entry.key], entry.estimate, current))
        try:
            with metrics.PLAN_SECONDS.time():
                result: Plan = plan(reading.inventory, requests, now=now, schedule=schedule)
        except ValueError as exc:
            # Bad input the CRD cannot rule out (e.g. an inventory the planner refuses): report, keep config.
            logger.error("planning %s failed: %s", label, exc)
            return PatchResult({}, f"planning failed, serve config unchanged: {exc}")
        metrics.GPUS_AVAILABLE.labels(label).set(result.gpus_total)
        metrics.GPUS_PLANNED.labels(label).set(result.gpus_used)
        estimates = {e.key: e.estimate for e in live if e.estimate is not None}
        config = render_serve_config(result, deployments, options=self.options, estimates=estimates)
        try:
            check_serve_config(config)
        except ServeConfigInvalid as exc:
            # A renderer bug must never reach KubeRay (it does not validate serveConfigV2 itself).
            logger.error("refusing to patch %s: %s", label, exc)
            return PatchResult(result.by_key, f"rendered Serve config is invalid, not applied: {exc}")
        text = serve_config_text(config)
        uid = str(ray_service.get("metadata", {}).get("uid") or "")
        on_cluster = current_serve_config(ray_service)
        if text == on_cluster:
            self._written[target] = _Written(uid, text)
            return PatchResult(result.by_key)
        if self.overwritten(target, ray_service):
            await self.recorder.post(ray_service, OVERWRITTEN, "serveConfigV2 was changed outside ndif-operator "
                                     "(e.g. kubectl apply of a manifest that carries it: leave serveConfigV2 out "
                                     "of RayService manifests); restoring the planned config", warning=True)
            logger.warning("serveConfigV2 of %s was changed outside ndif-operator; restoring it", label)
        try:
            await self.api.patch_serve_config(namespace, name, text)
        except KubeError as exc:
            metrics.PATCHES.labels("error").inc()
            return PatchResult(result.by_key, f"cannot update RayService {label}: {exc}; retrying")
        metrics.PATCHES.labels("ok").inc()
        self.patches += 1
        self._written[target] = _Written(uid, text)
        logger.info("patched serveConfigV2 of %s (%d applications)", label, len(config["applications"]))
        return PatchResult(result.by_key)

    def overwritten(self, target: Target, ray_service: dict[str, Any]) -> bool:
        """Whether this RayService (same uid) holds a config this operator neither planned nor wrote."""
        written = self._written.get(target)
        uid = str(ray_service.get("metadata", {}).get("uid") or "")
        return written is not None and written.uid == uid and current_serve_config(ray_service) != written.text

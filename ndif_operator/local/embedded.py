"""Embedded mode end to end: a local Ray head, the operator's plan applied through Serve's REST API.

    with stop_on_signals(), LocalMode(settings) as mode:  # start Ray, plan, apply, wait until RUNNING
        print(mode.table())
        ...                                # serve until Ctrl-C / SIGTERM raises `Stopped`
    # leaving the block stops everything that was started

Nothing in here imports `ray`: Ray runs as `ray start` in a subprocess, Serve is driven over HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from ndif_operator.api import GatewayAppArgs, Level, ModelDeployment
from ndif_operator.api.pinning import node_labels, node_resources
from ndif_operator.evaluation import EstimateCache
from ndif_operator.local.activation import (
    DEFAULT_TTL_S,
    DemandWatcher,
    active_keys,
    candidates,
    next_windows,
    read_gateway_demands,
)
from ndif_operator.local.inventory import DEFAULT_RESERVED_BYTES, LocalInventory, build_inventory, detect_machine
from ndif_operator.local.manifests import load_manifests
from ndif_operator.local.pipeline import LocalPlan, plan_local
from ndif_operator.local.ray_head import LOOPBACK, LocalRayHead, RayHeadSpec, RayPorts
from ndif_operator.local.serve_rest import AppProgress, ServeRestClient, ServeRestError, app_progress
from ndif_operator.local.table import model_table
from ndif_operator.planning.activation import Demand

API_KEY_HASHES_ENV = "NDIF_API_KEY_HASHES"


def repo_root() -> Path:
    """The checkout that holds `model_runtime` (the replicas import it via PYTHONPATH)."""
    return Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class LocalSettings:
    manifests: tuple[Path, ...]
    ports: RayPorts = field(default_factory=RayPorts)
    num_cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    reserved_memory_bytes: int = DEFAULT_RESERVED_BYTES
    deploy_timeout_s: float = 600.0
    api_key_hashes: tuple[str, ...] = ()  # sha256 hex digests; empty = no auth (loopback, one user)
    object_store_bucket: str | None = None
    object_store_endpoint_url: str | None = None
    temp_dir: Path | None = None
    extra_pythonpath: tuple[str, ...] = ()
    activation_ttl_s: float = DEFAULT_TTL_S  # activateOnRequest: how long a requested Warm model is Hot
    gateway_api_key: str | None = None  # sent to the local gateway's /status (when keys are required)

    def gateway_args(self) -> GatewayAppArgs:
        return GatewayAppArgs(
            api_key_hashes_env=API_KEY_HASHES_ENV,
            direct_port=self.ports.gateway_direct,
            direct_host=LOOPBACK,
            object_store_bucket=self.object_store_bucket,
            object_store_endpoint_url=self.object_store_endpoint_url,
        )

    def head_spec(self, local: LocalInventory, plan: LocalPlan | None = None) -> RayHeadSpec:
        env = {API_KEY_HASHES_ENV: ",".join(self.api_key_hashes)}
        # The one pod of the local inventory: declare its GPUs and its name so pinned replicas fit.
        (group,) = local.inventory.groups
        pinning = not local.cpu_only
        return RayHeadSpec(
            num_cpus=self.num_cpus,
            num_gpus=local.gpus,
            ports=self.ports,
            temp_dir=self.temp_dir,
            pythonpath=(str(repo_root()), *self.extra_pythonpath),
            env=env,
            object_store_bytes=object_store_bytes(plan),
            resources=node_resources(group.gpus_per_pod) if pinning else {},
            labels=node_labels(group.name, 0),
        )


class LocalMode:
    """Bring up, report, and tear down one embedded deployment. `down()` is idempotent."""

    def __init__(self, settings: LocalSettings, *, log: Callable[[str], None] = print) -> None:
        self.settings = settings
        self._log = log
        self.plan: LocalPlan | None = None
        self.head: LocalRayHead | None = None
        self.rest: ServeRestClient | None = None
        self.deployments: list[ModelDeployment] = []
        self.local: LocalInventory | None = None
        self.cache = EstimateCache()  # re-plans on activation read no checkpoint again
        self.windows: dict[str, datetime] = {}  # activateOnRequest: deployment key → Hot until
        self.active: frozenset[str] = frozenset()  # keys planned Hot on request in the applied config

    @property
    def ndif_host(self) -> str:
        """What clients use: the gateway replica's own listener (no Serve proxy hop)."""
        return f"http://{LOOPBACK}:{self.settings.ports.gateway_direct}"

    @property
    def serve_url(self) -> str:
        """The same gateway through Serve's proxy (its routes, health and REST-applied config)."""
        return f"http://{LOOPBACK}:{self.settings.ports.serve_http}"

    def up(self) -> LocalPlan:
        settings = self.settings
        deployments = load_manifests(settings.manifests, on_skip=self._log)
        local = build_inventory(detect_machine(), reserved_bytes=settings.reserved_memory_bytes)
        self.deployments, self.local = list(deployments), local
        self.plan = plan_local(
            deployments, local, serve_port=settings.ports.serve_http, gateway=settings.gateway_args(),
            cache=self.cache,
        )
        where = "CPU only (host RAM as the device)" if local.cpu_only else f"{local.gpus} GPU(s)"
        self._log(f"planned {len(deployments)} model(s) on this machine: {where}")
        self.head = LocalRayHead(settings.head_spec(local, self.plan), log=self._log)
        self.head.start()
        self.rest = ServeRestClient(self.head.spec.dashboard_url)
        self._log(f"applying the Serve config ({len(self.plan.expected_apps)} applications) ...")
        self.rest.apply(self.plan.config)
        try:
            self.rest.wait_running(
                self.plan.expected_apps,
                timeout=settings.deploy_timeout_s,
                on_progress=lambda line: self._log(f"  waiting: {line}"),
            )
        except ServeRestError as exc:
            logs = self.head.spec.resolved_temp_dir / "session_latest" / "logs" / "serve"
            raise ServeRestError(f"{exc}\n  (replica and controller logs: {logs})") from exc
        return self.plan

    def demand_watcher(self) -> DemandWatcher | None:
        """A started watcher of the gateway's pushed demand, or None when no model activates on request."""
        if not candidates(self.deployments):
            return None
        return DemandWatcher(self.ndif_host, self.settings.gateway_api_key).start()

    def poll_activation(self, now: datetime | None = None, *, gateway_url: str | None = None,
                        demands: Mapping[str, Demand] | None = None) -> bool:
        """activateOnRequest: take the gateway's demand (pushed `demands`, else read `/status`);
        re-plan and PUT the config when the set of models Hot on request changes. Returns whether
        a new config was applied."""
        if self.plan is None or self.rest is None or self.local is None or not candidates(self.deployments):
            return False
        now = now or datetime.now(UTC)
        if demands is None:
            demands = read_gateway_demands(gateway_url or self.ndif_host, self.settings.gateway_api_key)
        self.windows = next_windows(self.deployments, demands, self.windows, now=now,
                                    ttl_s=self.settings.activation_ttl_s)
        wanted = active_keys(self.windows, now)
        if wanted == self.active:
            return False
        settings = self.settings
        self.plan = plan_local(self.deployments, self.local, serve_port=settings.ports.serve_http,
                               gateway=settings.gateway_args(), cache=self.cache, now=now, activated=wanted)
        self.rest.apply(self.plan.config)
        for key in sorted(wanted - self.active):
            self._log(f"{key}: requested while Warm: Hot until {self.windows[key].isoformat()} (activateOnRequest)")
        for key in sorted(self.active - wanted):
            self._log(f"{key}: no longer Hot on request: back to Warm")
        self.active = wanted
        return True

    def progress(self) -> dict[str, AppProgress]:
        return app_progress(self.rest.details()) if self.rest is not None else {}

    def table(self) -> str:
        if self.plan is None:
            return ""
        return model_table(self.plan, self.progress())

    def ready_info(self) -> dict[str, Any]:
        assert self.plan is not None and self.head is not None
        return {
            "ndif_host": self.ndif_host,
            "serve_url": self.serve_url,
            "dashboard": self.head.spec.dashboard_url,
            "applications": sorted(self.plan.expected_apps),
            "pid": os.getpid(),
        }

    def down(self) -> None:
        if self.head is not None:
            self.head.stop()
            self.head = None

    def __enter__(self) -> LocalMode:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def object_store_bytes(plan: LocalPlan | None) -> int:
    """Ray's object store for this run: room for the host copies of every model planned Hot or Warm
    (the node's weight store keeps them there, model_runtime/weight_store.py), plus Ray's default
    512 MiB. Sized from the plan, not from the machine: Ray refuses to start when the object store
    leaves too little of the memory that is free now (other programs share the machine)."""
    base = RayHeadSpec.object_store_bytes
    if plan is None:
        return base
    weights = sum(plan.estimates[d.key].weights_bytes for d in plan.plan.decisions
                  if d.level != Level.COLD and d.key in plan.estimates)
    return base + weights * 5 // 4  # a quarter spare: a new revision is sealed before the old one goes


def write_ready_file(path: Path, info: dict[str, Any]) -> None:
    """Atomically: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(path)


class Stopped(Exception):
    """Raised in the main thread by SIGINT/SIGTERM so that `finally` blocks tear down."""


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """Turn the first SIGINT/SIGTERM into `Stopped`; later ones are ignored so teardown finishes."""
    event = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        if event.is_set():
            return
        event.set()
        raise Stopped(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield event
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

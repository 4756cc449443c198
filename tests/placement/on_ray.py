"""A tight plan from the project's planner, rendered by its renderer, deployed on a real Ray cluster
of two nodes on 127.0.0.1 that declare 8 GPUs each (no GPU needed), with trivial replicas in place
of models; then: how many replicas run, and does every GPU hold what the plan says?

Used by tests/placement/test_placement_on_ray.py and bench/placement_on_ray.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ndif_operator.api import Estimate, ModelDeployment
from ndif_operator.api.pinning import node_labels, node_resources
from ndif_operator.local.ray_head import LOOPBACK, RayHeadSpec, RayPorts, busy_ports, processes_of, start_env
from ndif_operator.local.ray_head import _terminate_with_parent as terminate_with_parent
from ndif_operator.local.serve_rest import ServeRestClient, ServeRestError
from ndif_operator.planning import Inventory, Plan, ReplicaPlacement, WorkerGroup, plan
from ndif_operator.planning.requests import placement_request
from ndif_operator.rendering import RenderOptions, check_serve_config, render_serve_config

GIB = 2**30
GROUP, PODS, GPUS = "gpu", 2, 8
PROBE_IMPORT_PATH = "tests.placement.probe_app:build_app"
GATEWAY_PROBE_IMPORT_PATH = "tests.placement.probe_app:build_gateway"
ROOT = Path(__file__).resolve().parents[2]
# (name, GiB per replica, replicas, tensorParallelSize): ~99 % of 16 x 80 GiB with TP=4 and TP=2.
MIX = (("tp4", 190, 2, 4), ("tp2", 130, 2, 2), ("big", 78, 4, 1), ("mid", 32, 8, 1), ("small", 14.5, 4, 1))
ORDERS = ("all-at-once", "one-by-one", "reversed-rapid")

Gpu = tuple[str, int]  # (pod label, GPU index)


# --- the plan -------------------------------------------------------------------------------------


def inventory() -> Inventory:
    return Inventory((WorkerGroup(GROUP, PODS, GPUS, 80 * GIB, 200 * GIB),))


def deployments() -> dict[str, ModelDeployment]:
    return {f"ml/{name}": ModelDeployment.model_validate({
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {"model": {"repoId": f"org/{name}"}, "replicas": replicas, "tensorParallelSize": tp}})
        for name, _, replicas, tp in MIX}


def estimates() -> dict[str, Estimate]:
    return {f"ml/{name}": Estimate(weights_bytes=int(gib * GIB * 0.8), total_bytes=int(gib * GIB), method="Config")
            for name, gib, _, _ in MIX}


def tight_plan() -> Plan:
    mds, sized = deployments(), estimates()
    return plan(inventory(), [placement_request(k, md, sized[k]) for k, md in mds.items()], now=datetime.now(UTC))


def moved_plan(first: Plan) -> tuple[Plan, str]:
    """The redeploy: one `big` replica goes, and one `small` replica moves to the GPU it frees."""
    big, small = first.decision("ml/big"), first.decision("ml/small")
    freed = big.assignments[-1]
    moved = (*small.assignments[:-1], ReplicaPlacement(pod=freed.pod, gpus=freed.gpus, fraction=small.gpu_fraction))
    decisions = [replace(big, replicas=big.replicas - 1, assignments=big.assignments[:-1])
                 if d.key == "ml/big" else replace(small, assignments=moved, moved=True)
                 if d.key == "ml/small" else d for d in first.decisions]
    return Plan(decisions=tuple(decisions)), (f"ml/small replica {len(moved) - 1}: pod {small.assignments[-1].pod} "
                                              f"GPU {small.assignments[-1].gpus} -> pod {freed.pod} GPU {freed.gpus}")


def utilisation(the_plan: Plan) -> float:
    shares = sum(d.replicas * d.gpus_per_replica for d in the_plan.decisions)
    return shares / (PODS * GPUS)


def render(the_plan: Plan, *, pinned: bool, probe_dir: Path) -> dict[str, Any]:
    options = RenderOptions(pin_gpus=pinned, replica_num_cpus=0, gateway_num_cpus=0, http_host=LOOPBACK,
                            replica_env=(("NDIF_PROBE_DIR", str(probe_dir)),))
    config = render_serve_config(the_plan, deployments(), options=options, estimates=estimates())
    config["proxy_location"] = "HeadOnly"
    check_serve_config(config)
    # Trivial replicas in place of models (and no gateway: nothing here sends traces).
    apps = [dict(app, import_path=PROBE_IMPORT_PATH) for app in config["applications"] if app["name"] != "gateway"]
    return {**config, "applications": apps}


def planned_gpus(the_plan: Plan) -> dict[Gpu, Counter[tuple[str, float]]]:
    """What each GPU should hold: (deployment, share) per replica rank on it."""
    held: dict[Gpu, Counter[tuple[str, float]]] = {(f"{GROUP}-{p}", g): Counter() for p in range(PODS)
                                                   for g in range(GPUS)}
    for d in the_plan.decisions:
        for a in d.assignments:
            for gpu in a.gpus:
                held[(f"{GROUP}-{a.pod}", gpu)][(d.key, round(d.gpu_fraction, 4))] += 1
    return held


# --- the cluster ----------------------------------------------------------------------------------


@dataclass
class Cluster:
    process: subprocess.Popen[bytes]
    client: ServeRestClient
    probe_dir: Path


def _free_ports() -> RayPorts:
    for _ in range(50):
        ports = RayPorts.offset(random.randrange(200, RayPorts.MAX_OFFSET))
        if not busy_ports(ports):
            return ports
    raise RuntimeError("no free block of Ray ports on 127.0.0.1")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@contextmanager
def two_node_cluster(log: Callable[[str], None] = lambda _: None) -> Iterator[Cluster]:
    """Head (pod gpu-0) and one worker node (pod gpu-1), 8 declared GPUs and the pinning
    resources and label each, on 127.0.0.1; stopped by PID afterwards (never `ray stop`)."""
    ports = _free_ports()
    temp_dir = Path(f"/tmp/ndif-place-{ports.gcs}")
    temp_dir.mkdir(parents=True, exist_ok=True)
    probe_dir = Path(tempfile.mkdtemp(prefix="ndif-probe-"))
    head_env = RayHeadSpec(num_cpus=2, ports=ports, pythonpath=(str(ROOT),), temp_dir=temp_dir)
    spec = {"num_cpus": 2, "num_gpus": GPUS, "object_store_bytes": 200 * 1024**2, "temp_dir": str(temp_dir),
            "gcs_port": ports.gcs, "dashboard_port": ports.dashboard, "agent_port": ports.dashboard_agent_listen,
            "nodes": [{"resources": node_resources(GPUS), "labels": node_labels(GROUP, pod)} for pod in range(PODS)]}
    log(f"starting a 2-node Ray cluster on {LOOPBACK} (dashboard {head_env.dashboard_url}, files in {temp_dir})")
    out = open(temp_dir / "cluster.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "tests.placement.cluster_main", json.dumps(spec)],
                            env=start_env(head_env, os.environ), stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=ROOT,
                            preexec_fn=terminate_with_parent)  # no orphan cluster if we are killed
    try:
        _wait_ready(temp_dir / "cluster.log", proc, timeout=180)
        yield Cluster(proc, ServeRestClient(head_env.dashboard_url, timeout=60), probe_dir)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        leftovers = processes_of(temp_dir)
        deadline = time.monotonic() + 10
        while leftovers and time.monotonic() < deadline:
            time.sleep(0.5)
            leftovers = processes_of(temp_dir)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out.close()


def _wait_ready(log_path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if b"READY" in log_path.read_bytes():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"the Ray cluster exited with {proc.returncode}; see {log_path}")
        time.sleep(1)
    raise RuntimeError(f"the Ray cluster did not come up within {timeout:.0f}s; see {log_path}")


# --- deploying and observing ----------------------------------------------------------------------


def _details(cluster: Cluster) -> dict[str, Any] | None:
    """Serve's view, or None when the dashboard is too busy to answer in time (a loaded machine)."""
    try:
        return cluster.client.details()
    except ServeRestError:
        return None


def clear(cluster: Cluster, timeout: float = 300) -> None:
    cluster.client.apply({"applications": []})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        details = _details(cluster)
        if details is not None and not details.get("applications"):
            break
        time.sleep(1)
    for path in cluster.probe_dir.glob("*.json"):
        path.unlink()


def deploy(cluster: Cluster, config: dict[str, Any], order: str) -> None:
    """Submit `config` the way `order` says (the whole config, app by app, or reversed quickly)."""
    apps = config["applications"]
    if order == "all-at-once":
        cluster.client.apply(config)
        return
    sequence = list(reversed(apps)) if order == "reversed-rapid" else apps
    for n in range(1, len(sequence) + 1):
        cluster.client.apply({**config, "applications": sequence[:n]})
        time.sleep(0.2 if order == "reversed-rapid" else 2.0)


@dataclass(frozen=True)
class Outcome:
    running: int
    replicas: int
    gpus_as_planned: int
    gpus: int
    pending: tuple[str, ...]  # apps with replicas Ray has not scheduled, with Serve's message

    def line(self) -> str:
        return (f"{self.running}/{self.replicas} replicas running, "
                f"{self.gpus_as_planned}/{self.gpus} GPUs as planned")


def _running_actors(details: dict[str, Any]) -> set[str]:
    return {str(r.get("actor_id")) for app in (details.get("applications") or {}).values()
            for dep in (app.get("deployments") or {}).values() for r in dep.get("replicas") or []
            if r.get("state") == "RUNNING"}


def _matching(cluster: Cluster, actors: set[str], the_plan: Plan) -> tuple[int, int]:
    """(replicas reported, GPUs whose held set equals the plan's) for the running `actors`."""
    records = [json.loads((cluster.probe_dir / f"{actor}.json").read_text()) for actor in sorted(actors)]
    actual: dict[Gpu, Counter[tuple[str, float]]] = {}
    for record in records:
        for rank in record["ranks"]:
            actual.setdefault((rank["pod"], rank["gpu"]), Counter())[(record["deployment"], rank["share"])] += 1
    expected = planned_gpus(the_plan)
    return len(records), sum(1 for gpu, held in expected.items() if actual.get(gpu, Counter()) == held)


def observe(cluster: Cluster, the_plan: Plan, *, timeout: float, settle: float = 90.0) -> Outcome:
    """Wait until every planned replica runs, or no replica has changed state for `settle` seconds
    (what Ray cannot schedule stays PENDING_ALLOCATION forever)."""
    wanted = sum(d.replicas for d in the_plan.decisions)
    deadline, last_change, last = time.monotonic() + timeout, time.monotonic(), None
    details: dict[str, Any] = {}
    running: set[str] = set()
    reported: set[str] = set()
    while True:
        fresh = _details(cluster)
        if fresh is None:
            if time.monotonic() > deadline:
                break
            time.sleep(2)
            continue
        details = fresh
        running = _running_actors(details)
        reported = {p.stem for p in cluster.probe_dir.glob("*.json")}
        states = sorted((str(r.get("replica_id")), str(r.get("state"))) for app in (details.get("applications") or {})
                        .values() for dep in (app.get("deployments") or {}).values() for r in dep.get("replicas") or [])
        fingerprint = (tuple(states), len(running & reported))
        if fingerprint != last:
            last, last_change = fingerprint, time.monotonic()
        # Done only when the cluster holds the plan: during a rolling update the old replica still
        # runs (and counts) until its successor is up.
        done = (len(running & reported) >= wanted and all(state == "RUNNING" for _, state in states)
                and _matching(cluster, running & reported, the_plan)[1] == PODS * GPUS)
        if done or time.monotonic() > deadline or time.monotonic() - last_change > settle:
            break
        time.sleep(2)
    records, matching = _matching(cluster, running & reported, the_plan)
    pending = tuple(sorted(f"{name}: {dep.get('message', '')[:300]}"
                           for name, app in (details.get("applications") or {}).items()
                           for dep in (app.get("deployments") or {}).values()
                           if "to be scheduled" in str(dep.get("message") or "")))
    return Outcome(running=records, replicas=wanted, gpus_as_planned=matching, gpus=PODS * GPUS,
                   pending=pending)


def run_orders(cluster: Cluster, the_plan: Plan, *, pinned: bool, orders: Sequence[str], timeout: float,
               log: Callable[[str], None] = lambda _: None, settle: float = 90.0) -> dict[str, Outcome]:
    results: dict[str, Outcome] = {}
    config = render(the_plan, pinned=pinned, probe_dir=cluster.probe_dir)
    for order in orders:
        clear(cluster)
        deploy(cluster, config, order)
        results[order] = observe(cluster, the_plan, timeout=timeout, settle=settle)
        log(f"{'pinned' if pinned else 'unpinned'} {order}: {results[order].line()}")
    return results


def redeploy(cluster: Cluster, second: Plan, *, pinned: bool, timeout: float) -> Outcome:
    """Apply `second` over whatever runs now (no clearing): Serve moves what changed. Reports of
    replicas that stopped stay on disk but only running replicas' reports count."""
    config = render(second, pinned=pinned, probe_dir=cluster.probe_dir)
    cluster.client.apply(config)
    return observe(cluster, second, timeout=timeout)


def gateway_nodes(cluster: Cluster, *, replicas: int, pinned: bool, timeout: float = 300) -> list[bool]:
    """Deploy the rendered gateway application (`replicas` replicas, a probe in place of the
    gateway) and return, per replica, whether it runs on the head node. `pinned` False drops the
    rendered head-node resource, to show that Ray would otherwise spread the gateway."""
    from ndif_operator.api.naming import GATEWAY_APP

    clear(cluster)
    options = RenderOptions(gateway_replicas=replicas, http_host=LOOPBACK)
    config = render_serve_config(Plan(decisions=()), {}, options=options)
    config["proxy_location"] = "HeadOnly"
    check_serve_config(config)
    (gateway,) = [app for app in config["applications"] if app["name"] == GATEWAY_APP]
    (deployment,) = gateway["deployments"]
    actor = dict(deployment["ray_actor_options"], runtime_env={"env_vars": {"NDIF_PROBE_DIR": str(cluster.probe_dir)}})
    if not pinned:
        actor.pop("resources")
    probe = {**gateway, "import_path": GATEWAY_PROBE_IMPORT_PATH,
             "deployments": [{**deployment, "ray_actor_options": actor}]}
    cluster.client.apply({**config, "applications": [probe]})
    deadline = time.monotonic() + timeout
    while len(reports := sorted(cluster.probe_dir.glob("gateway-*.json"))) < replicas:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(reports)}/{replicas} gateway replicas reported within {timeout:.0f}s")
        time.sleep(1)
    return [bool(json.loads(path.read_text())["on_head"]) for path in reports]

"""The operator's integration-test harness: the emulated API server, kopf in a thread, kubectl.

A module (not conftest.py) so that tests and bench/reconcile.py import it by a unique name."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from kube_emulator import RAY_SERVICE, Identity, KubeEmulator, ResourceType, from_crd, service_account

from ndif_operator.api import Estimate, ModelSpec, RuntimeLimits
from ndif_operator.api.crd import CALENDAR_SCHEDULE, MODEL_DEPLOYMENT, build
from ndif_operator.api.v1alpha1 import GIB
from ndif_operator.api.validation import apply_defaults, validate_object
from ndif_operator.operator.handlers import run_operator
from ndif_operator.operator.login import Login
from ndif_operator.operator.settings import OperatorSettings
from ndif_operator.rendering.pinned import slot_app_names

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = str(ROOT / ".venv" / "bin" / "kubectl")
MD_TYPE: ResourceType = from_crd(build(MODEL_DEPLOYMENT),
                                 validate=lambda obj, old: [str(e) for e in validate_object(obj, old)],
                                 default=apply_defaults)
CALENDAR_TYPE: ResourceType = from_crd(build(CALENDAR_SCHEDULE))
NAMESPACE = "ml"
OPERATOR_NAMESPACE = "ndif-system"  # the chart's release namespace: evaluator cache, Jobs, Secrets
CHART = ROOT / "charts" / "ndif-operator"
_RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


@functools.cache
def chart_rbac(namespaces: tuple[str, ...] = ()) -> tuple[dict[str, Any], ...]:
    """The ServiceAccount, roles and bindings that `helm install` of the chart creates (rendered by
    the real Helm library): cluster-wide, or namespaced-only for `namespaces`."""
    import helm_python

    helm_python.disable_logging()
    values = {"watch": {"namespaced": True, "namespaces": list(namespaces)}} if namespaces else {}
    chart = helm_python.Chart.load(CHART)
    try:
        rendered = chart.render(values, name="ndif-operator", namespace=OPERATOR_NAMESPACE, is_install=True)
    finally:
        chart.close()
    return tuple(doc for name in sorted(rendered) if name.endswith(".yaml")
                 for doc in yaml.safe_load_all(rendered[name]) if doc and doc.get("kind") in _RBAC_KINDS)


def size_estimator(model: ModelSpec, limits: RuntimeLimits, credentials: object = None) -> Estimate:
    """Sizes from the repo id (`org/m-<GiB>`): the real evaluator is another component, and capacity
    scenarios need exact sizes. `org/broken-*` cannot be sized."""
    match = re.search(r"-(\d+(?:\.\d+)?)g$", model.repo_id.lower())
    if model.repo_id.lower().startswith("org/broken"):
        from ndif_operator.evaluation import EstimateError

        raise EstimateError("no safetensors headers and no config.json")
    total = int(float(match.group(1)) * GIB) if match else GIB
    return Estimate(weights_bytes=int(total * 0.8), total_bytes=total, method="SafetensorsHeaders")


def ray_service(name: str = "ndif", *, groups: tuple[tuple[str, int, int, str], ...] = (("gpu", 1, 2, "80Gi"),),
                namespace: str = NAMESPACE) -> dict[str, Any]:
    """A RayService with worker groups (name, pods, GPUs per pod, GPU memory)."""
    worker_groups = [{
        "groupName": group, "replicas": pods, "minReplicas": pods, "maxReplicas": pods,
        "rayStartParams": {},
        "template": {
            "metadata": {"annotations": {"ndif.dev/gpu-memory": memory}},
            "spec": {"containers": [{"name": "ray-worker", "image": "ndif/runtime:test", "resources": {
                "limits": {"nvidia.com/gpu": str(gpus), "memory": "64Gi", "cpu": "8"}}}]},
        },
    } for group, pods, gpus, memory in groups]
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"serveConfigV2": "", "rayClusterConfig": {
            "rayVersion": "2.60.0",
            "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": {"spec": {"containers": [
                {"name": "ray-head", "image": "ndif/runtime:test"}]}}},
            "workerGroupSpecs": worker_groups}},
    }


def model_deployment(name: str, repo: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "ndif.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": spec.pop("namespace", NAMESPACE)},
            "spec": {"model": {"repoId": repo}, **spec}}


class Cluster:
    """The emulator with the chart's RBAC installed, plus helpers the scenarios share.

    The operator runs as the chart's ServiceAccount with a token (`operator_settings()`); kubectl
    (`kubectl()`) and the sync accessors act as the cluster admin. `namespaces`: install the chart
    namespaced-only for these namespaces instead of cluster-wide."""

    def __init__(self, emulator: KubeEmulator, tmp: Path, *, namespaces: tuple[str, ...] = ()) -> None:
        self.emu = emulator
        self.kubeconfig = emulator.write_kubeconfig(tmp / "kubeconfig.json")
        self.cache = tmp / "kubecache"
        self.namespaces = namespaces
        if emulator.get_sync(emulator.rtype("", "v1", "namespaces"), None, OPERATOR_NAMESPACE) is None:
            emulator.create_sync({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NAMESPACE}})
        for doc in chart_rbac(namespaces):
            emulator.create_sync(doc)
        account = next(d for d in chart_rbac(namespaces) if d["kind"] == "ServiceAccount")["metadata"]["name"]
        self.operator_identity: Identity = service_account(OPERATOR_NAMESPACE, account)
        self.token_file = tmp / "operator-token"
        self.token_file.write_text(emulator.issue_token(self.operator_identity))

    def operator_settings(self) -> dict[str, Any]:
        """How the operator logs in: the API server's URL and CA, the service account's token file."""
        settings: dict[str, Any] = {"kube_api_url": self.emu.url, "kube_token_file": str(self.token_file),
                                    "operator_namespace": OPERATOR_NAMESPACE}
        if self.emu.ca_path is not None:
            settings["kube_ca_file"] = str(self.emu.ca_path)
        if self.namespaces:
            settings.update(namespaces=",".join(self.namespaces), read_nodes=False)  # as the chart sets them
        return settings

    def login(self) -> Login:
        """The operator's credentials, resolved (for a `KubeApi` outside a running operator)."""
        login = Login(OperatorSettings(**self.operator_settings()))
        login.resolve()
        return login

    def operator_env(self) -> dict[str, str]:
        """`operator_settings()` as the NDIF_* environment of `ndif-operator run`."""
        return {f"NDIF_{key.upper()}": str(value).lower() if isinstance(value, bool) else str(value)
                for key, value in self.operator_settings().items()}

    def operator_requests(self) -> list[Any]:
        return [e for e in list(self.emu.log) if e.user == self.operator_identity.user]

    def md(self, name: str, namespace: str = NAMESPACE) -> dict[str, Any] | None:
        return self.emu.get_sync(MD_TYPE, namespace, name)

    def rs(self, name: str = "ndif", namespace: str = NAMESPACE) -> dict[str, Any] | None:
        return self.emu.get_sync(RAY_SERVICE, namespace, name)

    def serve_config(self, name: str = "ndif") -> dict[str, Any]:
        text = (self.rs(name) or {}).get("spec", {}).get("serveConfigV2") or "{}"
        return dict(json.loads(text))

    def apps(self, name: str = "ndif") -> dict[str, Any]:
        return {app["name"]: app for app in self.serve_config(name).get("applications", [])}

    def replicas(self, app: str, name: str = "ndif") -> int:
        """Replicas of a model over its applications (one per pinned replica slot)."""
        return sum(int(d.get("num_replicas", 0)) for a in slot_app_names(app, list(self.apps(name)))
                   for d in self.apps(name)[a]["deployments"])

    def gpu_share(self, app: str, name: str = "ndif") -> float:
        """The GPU share one replica of `app` asks Ray for (pinned: its ndif_gpu_<i> resource, which
        a single-GPU replica leases itself from its user_config's gpu_lease)."""
        deployment = self.apps(name)[app]["deployments"][0]
        options = deployment["ray_actor_options"]
        lease = (deployment.get("user_config") or {}).get("gpu_lease") or {}
        return float(sum(lease.values()) or sum((options.get("resources") or {}).values()) or options["num_gpus"])

    def condition(self, name: str, kind: str) -> dict[str, Any]:
        obj = self.md(name) or {}
        return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == kind), {})

    def secret(self, name: str, data: dict[str, str], namespace: str = OPERATOR_NAMESPACE) -> None:
        """A Secret (stringData-style values, stored base64 as the server does)."""
        import base64

        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        self.emu.create_sync({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                              "metadata": {"name": name, "namespace": namespace}, "data": encoded})

    def rs_patches(self) -> int:
        return len([e for e in self.emu.requests("PATCH", r"/rayservices/[^/]+$") if e.status == 200])

    def set_app_status(self, app: str, status: str, name: str = "ndif", message: str = "") -> None:
        current = (self.rs(name) or {}).get("status") or {}
        apps = dict((current.get("activeServiceStatus") or {}).get("applicationStatuses") or {})
        apps[app] = {"status": status, "message": message,
                     "serveDeploymentStatuses": {"ModelReplica": {"status": "HEALTHY" if status == "RUNNING"
                                                                  else "UPDATING"}}}
        self.emu.patch_sync(RAY_SERVICE, NAMESPACE, name, {"status": {
            "activeServiceStatus": {"rayClusterName": f"{name}-raycluster-abcde", "applicationStatuses": apps}}},
            subresource="status")

    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig), KUBECACHEDIR=str(self.cache))
        result = subprocess.run([KUBECTL, *args], env=env, capture_output=True, text=True, timeout=60, input=stdin)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result


def deploy_local_checkpoint(
    cluster: Cluster, checkpoint: Path, name: str = "tiny", repo: str = "org/tiny-llama", **build: Any
) -> None:
    """A tiny llama saved at `checkpoint` (`build`: e.g. safe_serialization=False), a RayService,
    and a ModelDeployment reading it from the node."""
    from model_runtime.tiny_models import build_tiny_model

    build_tiny_model("llama", checkpoint, **build)
    cluster.emu.create_sync(ray_service())
    manifest = model_deployment(name, repo)
    manifest["spec"]["model"].update(dtype="float32", source={"localPath": {"path": str(checkpoint)}})
    cluster.emu.create_sync(manifest)


def wait_for(predicate: Callable[[], Any], timeout: float = 45.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class OperatorThread:
    """`run_operator` in its own thread and event loop (embedded in the test's own loop, it costs 5 s),
    logged in as the chart's service account; `stop()` fails if the API server refused it (403,
    and 401 unless `expect_401`). `environ`: log in from these variables (e.g. KUBECONFIG) instead
    of the process environment (`service_account_dir`: where a pod's token, ca.crt and namespace are)."""

    def __init__(self, cluster: Cluster, *, estimator: Any = size_estimator, expect_401: bool = False,
                 environ: dict[str, str] | None = None, service_account_dir: Path | None = None,
                 **overrides: Any) -> None:
        self.estimator = estimator  # None: the real evaluator
        self.cluster = cluster
        self.expect_401 = expect_401
        values = {"metrics_port": 0, "health_port": 0, "debounce_seconds": 0.2,
                  "resync_seconds": 5.0, "read_nodes": True, "backoff_initial_seconds": 0.1,
                  "backoff_max_seconds": 1.0, **cluster.operator_settings(), **overrides}
        self.settings = OperatorSettings(**values)
        self.login = None if environ is None else Login(
            self.settings, environ=environ, **({"service_account_dir": service_account_dir}
                                               if service_account_dir is not None else {}))
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="kopf-operator", daemon=True)

    def _run(self) -> None:
        try:
            run_operator(self.settings, stop_flag=self.stop_flag, ready_flag=self.ready_flag,
                         estimator=self.estimator, login=self.login)
        except BaseException as exc:
            self.error = exc

    def start(self) -> OperatorThread:
        self.thread.start()
        if not self.ready_flag.wait(30):
            raise AssertionError(f"operator did not become ready: {self.error!r}")
        return self

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(90)  # Kopf ends its watches and the demand long-poll (up to 40 s) first
        assert not self.thread.is_alive(), "operator thread did not stop"
        assert self.error is None, f"operator crashed: {self.error!r}"
        refused = [e for e in self.cluster.operator_requests() if e.status == 403]
        if not self.expect_401:  # a 401 names no user: any in the log counts
            refused += [e for e in list(self.cluster.emu.log) if e.status == 401]
        assert not refused, f"the API server refused the operator (RBAC or login): {refused[:5]}"


class FakeGateway:
    """`GET /status` as the gateway serves it (only the fields the operator reads), on 127.0.0.1."""

    def __init__(self) -> None:
        self.body: dict[str, Any] = {"deployments": {}}
        self.keys_seen: list[str | None] = []
        self.waiting: tuple[str, Any] | None = None  # (deployment, GpuWait) served as the gateway does
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _status(self, request: web.Request) -> web.Response:
        self.keys_seen.append(request.headers.get("ndif-api-key"))
        if self.waiting is not None:  # the gateway's entry, made at the time of the request
            deployment, wait = self.waiting
            info = {"deployment": deployment, "deployment_level": "HOT", "gpu_wait": wait.as_json(time.time())}
            return web.json_response({"deployments": {"md-" + deployment.replace("/", "-"): info}})
        return web.json_response(self.body)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/status", self._status)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> FakeGateway:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def demand(self, deployment: str, *, at: float | None = None) -> None:
        info: dict[str, Any] = {"deployment": deployment, "activation_requested": True, "deployment_level": "WARM"}
        if at is not None:
            info["activation_requested_at"] = at
        self.body = {"deployments": {"md-" + deployment.replace("/", "-"): info}}

    def gpu_wait(self, deployment: str, message: str | None) -> None:
        """Say (or, None, stop saying) that `deployment`'s replica waits for a GPU share."""
        info: dict[str, Any] = {"deployment": deployment, "deployment_level": "HOT",
                                "gpu_wait": {"message": message} if message else None}
        self.body = {"deployments": {"md-" + deployment.replace("/", "-"): info}}
        self.waiting = None

    def gpu_wait_live(self, deployment: str, wait: Any) -> None:
        """Say that `deployment`'s replica waits, as the gateway does: `wait` (a
        `model_runtime.gpu_waits.GpuWait`) rendered at each request, its seconds waited included."""
        self.waiting = (deployment, wait)

"""`ndif-operator local` end to end: one real bring-up, a real nnsight client, Ctrl-C teardown.

One Ray head for the whole module (~10 s plus two replicas' imports); the tests run in file order
and the last one stops it the way a user would, then checks that nothing it started survives.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from model_runtime.tiny_models import build_tiny_model
from ndif_operator.local.ray_head import RayHeadSpec, RayPorts, processes_of

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PORT_OFFSET = 300  # a port block of its own: other suites run their own Ray on random ports
API_KEY = "local-test-key"
REPO_ID = "ndif-test/tiny-llama"
BUCKET = "ndif-local-results"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
MANIFEST = """\
apiVersion: ndif.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: tiny, namespace: lt}}
spec:
  model: {{repoId: {repo}, source: {{localPath: {{path: {path}}}}}, dtype: float32}}
  limits: {{maxBatchSize: 1, maxSequenceLength: 128}}
---
apiVersion: ndif.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: warm, namespace: lt}}
spec:
  model: {{repoId: ndif-test/warm-llama, source: {{localPath: {{path: {path}}}}}, dtype: float32}}
  level: Warm
  activateOnRequest: true
---
apiVersion: ndif.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: cold, namespace: lt}}
spec:
  model: {{repoId: ndif-test/cold-one, source: {{localPath: {{path: {path}}}}}}}
  level: Cold
"""


class LocalRun:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path, ready: Path, info: dict[str, Any]) -> None:
        self.proc, self.log, self.ready, self.info = proc, log, ready, info

    @property
    def url(self) -> str:
        return str(self.info["ndif_host"])

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _get(url: str, key: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"ndif-api-key": key} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("local") / "tiny-llama")


@pytest.fixture(scope="module")
def local_run(model_dir: Path, s3_endpoint: str) -> Iterator[LocalRun]:
    workdir = model_dir.parent
    manifest = workdir / "models.yaml"
    manifest.write_text(MANIFEST.format(repo=REPO_ID, path=model_dir))
    ready, log = workdir / "ready.json", workdir / "local.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ndif_operator.cli", "local", str(manifest), "--port-offset", str(PORT_OFFSET),
             "--ready-file", str(ready), "--api-key", API_KEY, "--num-cpus", "2", "--timeout", "300",
             "--object-store-bucket", BUCKET, "--object-store-endpoint", s3_endpoint],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **S3_ENV, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 400
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"local mode did not come up (exit {proc.poll()}):\n{log.read_text()[-5000:]}")
            time.sleep(0.5)
        yield LocalRun(proc, log, ready, json.loads(ready.read_text()))
    finally:
        if proc.poll() is None:  # the last test normally stopped it already
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_prints_the_model_table(local_run: LocalRun) -> None:
    out = local_run.output()
    assert "CPU only" in out or "GPU(s)" in out
    [tiny] = [line for line in out.splitlines() if line.startswith("lt/tiny ")]
    assert "ndif-test/tiny-llama" in tiny and "Hot" in tiny and "RUNNING" in tiny
    [warm] = [line for line in out.splitlines() if line.startswith("lt/warm ")]
    assert "Warm  " in warm and "PlacedWarm" in warm and "RUNNING" in warm  # its app holds the CPU copy
    [cold] = [line for line in out.splitlines() if line.startswith("lt/cold ")]
    assert "Cold" in cold and "PlacedCold" in cold
    assert f"NDIF_HOST={local_run.url}" in out


def test_gateway_requires_the_api_key_and_reports_levels(local_run: LocalRun) -> None:
    import httpx
    import websocket

    assert _get(f"{local_run.url}/ping")[0] == 401
    assert _get(f"{local_run.url}/ping", "wrong")[0] == 401
    # The door's lean routes check the key as the FastAPI ones do.
    post = httpx.post(f"{local_run.url}/request", data={"data": "{}"}, files={"blob": ("request", b"x")},
                      headers={"ndif-api-key": "wrong"})
    assert post.status_code == 401 and "API key" in post.json()["detail"]
    with pytest.raises(websocket.WebSocketException):
        websocket.create_connection(local_run.url.replace("http://", "ws://") + "/subscribe", timeout=10).recv()
    code, body = _get(f"{local_run.url}/status", API_KEY)
    assert code == 200
    by_repo = {d["repo_id"].lower(): d for d in json.loads(body)["deployments"].values()}
    assert by_repo[REPO_ID]["deployment_level"] == "HOT"
    assert by_repo[REPO_ID]["application_state"] == "RUNNING"
    assert by_repo["ndif-test/warm-llama"]["deployment_level"] == "WARM"
    assert by_repo["ndif-test/cold-one"]["deployment_level"] == "COLD"  # listed, as NDIF's /status does


def test_requests_for_warm_and_unknown_models_get_clear_errors(local_run: LocalRun) -> None:
    import httpx

    def post(repo: str) -> httpx.Response:
        envelope = {"model_key": f'nnsight.modeling.transformers.TransformersModel:{{"repo_id": "{repo}"}}'}
        return httpx.post(
            f"{local_run.url}/request", data={"data": json.dumps(envelope)},
            files={"blob": ("request", b"not read", "application/octet-stream")},
            headers={"ndif-api-key": API_KEY, "nnsight-version": "0.8.1"}, timeout=30,
        )  # fmt: skip

    warm = post("ndif-test/warm-llama")
    assert warm.status_code == 503 and "activation to HOT was requested" in warm.json()["detail"]
    assert int(warm.headers["retry-after"]) >= 1  # how long to wait, also said in the detail
    unknown = post("ndif-test/nope")
    assert unknown.status_code == 404 and "not deployed" in unknown.json()["detail"]
    cold = post("ndif-test/cold-one")  # COLD: no application, but routed with its level
    assert cold.status_code == 503 and "is COLD (on disk only" in cold.json()["detail"]


def test_requested_warm_model_becomes_hot_with_weights_from_node_memory(local_run: LocalRun, model_dir: Path) -> None:
    """The 503 above pushed the demand (`/demand`); local mode re-planned it Hot and PUT the config.
    On a CPU-only machine the rendered change is user_config and a replica count only, so Serve
    reconfigures the WARM replica in place: the same process copies the weights from the node's
    weight store instead of reading the checkpoint."""
    before = json.loads(_get(f"{local_run.url}/status", API_KEY)[1])["deployments"]
    process = next(d for d in before.values() if d["repo_id"] == "ndif-test/warm-llama")["replica_startup"]
    deadline = time.monotonic() + 180
    while True:
        status = json.loads(_get(f"{local_run.url}/status", API_KEY)[1])["deployments"]
        warm = next(d for d in status.values() if d["repo_id"] == "ndif-test/warm-llama")
        if warm["deployment_level"] == "HOT" and warm["application_state"] == "RUNNING":
            break
        assert time.monotonic() < deadline, f"never became HOT: {warm}\n{local_run.output()[-3000:]}"
        time.sleep(0.5)
    assert warm["load_source"] == "nodeMemory"
    assert warm["replica_startup"]["process_started"] == process["process_started"]  # kept, not replaced
    assert "lt/warm: requested while Warm: Hot until" in local_run.output()
    _assert_remote_trace_is_local(local_run.url, model_dir, "ndif-test/warm-llama")


def _assert_remote_trace_is_local(url: str, model_dir: Path, repo_id: str) -> None:
    """The unmodified nnsight client's remote trace through `url` equals a local trace."""
    import nnsight
    import torch
    from nnsight import TransformersModel
    from nnsight.modeling.huggingface import _ID_CACHE

    _ID_CACHE[str(model_dir)] = repo_id
    nnsight.CONFIG.API.HOST, nnsight.CONFIG.API.APIKEY = url, API_KEY
    nnsight.CONFIG.APP.REMOTE_LOGGING = False
    client = TransformersModel(str(model_dir), task="text-generation")
    with client.trace("The Eiffel Tower is in the city of", remote=True):
        remote = client.lm_head.output.save()
    local = TransformersModel(str(model_dir), task="text-generation", dispatch=True, device_map="cpu",
                              dtype="float32")
    with local.trace("The Eiffel Tower is in the city of"):
        expected = local.lm_head.output.save()
    assert torch.allclose(remote, expected, atol=1e-5)


def _serve_rest(local_run: LocalRun) -> Any:
    from ndif_operator.local.serve_rest import ServeRestClient

    return ServeRestClient(str(local_run.info["dashboard"]))


def _gateway_replicas(rest: Any) -> list[dict[str, Any]]:
    # While Serve deploys the new version the deployment may be missing from the details for a moment.
    gateway = rest.details()["applications"].get("gateway", {})
    return list(gateway.get("deployments", {}).get("NnsightGateway", {}).get("replicas", []))


def _applied(rest: Any) -> tuple[dict[str, Any], str]:
    """The config Serve runs (as applied through REST) and the one gateway replica's id."""
    details = rest.details()
    apps = details["applications"]
    (replica,) = apps["gateway"]["deployments"]["NnsightGateway"]["replicas"]
    http = {k: details["http_options"][k] for k in ("host", "port")}
    config = {"http_options": http, "applications": [a["deployed_app_config"] for a in apps.values()]}
    return config, str(replica["replica_id"])


def test_clients_reach_the_gateway_replica_directly(local_run: LocalRun) -> None:
    """The URL local mode prints is the gateway replica's own listener, not Serve's proxy, which
    keeps serving the same gateway on its own port."""
    assert local_run.url != local_run.info["serve_url"]
    for url in (local_run.url, str(local_run.info["serve_url"])):
        assert _get(f"{url}/ping", API_KEY) == (200, b"pong")
    assert f"NDIF_HOST={local_run.url}" in local_run.output()


def test_a_routing_change_reconfigures_the_gateway_in_place(local_run: LocalRun) -> None:
    """Through Serve's own config path (REST PUT, as KubeRay does): a change of the routing table
    only (the gateway's user_config) reaches the running gateway replica without replacing it."""
    rest = _serve_rest(local_run)

    def snapshot() -> tuple[dict[str, Any], str]:
        return _applied(rest)

    def cold_listed() -> bool:
        status = json.loads(_get(f"{local_run.url}/status", API_KEY)[1])["deployments"]
        return any(d["repo_id"] == "ndif-test/cold-one" for d in status.values())

    original, replica_id = snapshot()
    assert cold_listed()
    changed = json.loads(json.dumps(original))
    gateway = next(a for a in changed["applications"] if a["name"] == "gateway")
    del gateway["deployments"][0]["user_config"]["models"]["ndif-test/cold-one"]
    try:
        rest.apply(changed)
        deadline = time.monotonic() + 60
        while cold_listed():
            assert time.monotonic() < deadline, "the new routing table never reached the gateway"
            time.sleep(0.5)
        assert snapshot()[1] == replica_id  # the same replica: reconfigured, not restarted
    finally:
        rest.apply(original)
    deadline = time.monotonic() + 60
    while not cold_listed():
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert snapshot()[1] == replica_id


def test_unmodified_nnsight_client_script(
    local_run: LocalRun, model_dir: Path, s3_endpoint: str, tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "nnsight_client.py"), "--model-dir", str(model_dir),
         "--repo-id", REPO_ID, "--tokens", "3", "--check-local", "--json", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
        env={**os.environ, "NDIF_HOST": local_run.url, "NDIF_API_KEY": API_KEY, "NDIF_CLIENT_QUIET": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    data = json.loads(report.read_text())
    everything = {"hidden": True, "logits": True, "patched": True, "generated": True, "polled": True}
    assert data["equal_to_local"] == everything
    if "CPU only" in local_run.output():
        assert data["bit_equal_to_local"] == everything  # same kernels on both sides
    assert data["patch_shift"] > 0
    assert data["hidden_shape"][-1] == 64
    assert len(data["generated_ids"]) == data["logits_shape"][1] + 3
    # The non-blocking job's result had no websocket to ride on: it went through the object store.
    assert data["polled_equal"]
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, **_boto_credentials())
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert any(k.startswith("results/") for k in keys), keys


def test_the_door_survives_a_replaced_gateway_replica(local_run: LocalRun, model_dir: Path) -> None:
    """A change of the gateway's args (applied through REST, as KubeRay does) replaces its replica:
    the new one binds the same fixed port while the old one still listens, then takes the door. A
    client polling the door all along is never refused, and the unmodified nnsight client runs
    through it once the old replica is gone."""
    rest = _serve_rest(local_run)
    original, old = _applied(rest)
    changed = json.loads(json.dumps(original))
    gateway = next(a for a in changed["applications"] if a["name"] == "gateway")
    gateway["args"]["inline_result_max_bytes"] = int(gateway["args"].get("inline_result_max_bytes", 4 << 20)) + 1

    def replace_and_watch(config: dict[str, Any], previous: str) -> tuple[str, list[str]]:
        rest.apply(config)
        failures: list[str] = []
        deadline = time.monotonic() + 120
        while True:
            try:
                code, _ = _get(f"{local_run.url}/ping", API_KEY)
                if code != 200:
                    failures.append(f"HTTP {code}")
            except OSError as exc:  # refused or reset: nobody listening
                failures.append(repr(exc))
            replicas = _gateway_replicas(rest)
            if len(replicas) == 1 and replicas[0]["replica_id"] != previous and replicas[0]["state"] == "RUNNING":
                return str(replicas[0]["replica_id"]), failures
            assert time.monotonic() < deadline, f"the gateway replica was not replaced: {replicas}"
            time.sleep(0.1)

    try:
        new, failures = replace_and_watch(changed, old)
        assert failures == []
        _assert_remote_trace_is_local(local_run.url, model_dir, REPO_ID)
    finally:
        restored, failures = replace_and_watch(original, _applied(rest)[1])
    assert restored not in (old, new) and failures == []


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_ENV["AWS_DEFAULT_REGION"],
    }


def test_ctrl_c_stops_everything_it_started(local_run: LocalRun) -> None:
    temp_dir = RayHeadSpec(num_cpus=1, ports=RayPorts.offset(PORT_OFFSET)).resolved_temp_dir
    assert processes_of(temp_dir), "expected the head's processes to be running"
    local_run.proc.send_signal(signal.SIGINT)
    assert local_run.proc.wait(timeout=90) == 0, local_run.output()[-3000:]
    assert processes_of(temp_dir) == []
    assert not local_run.ready.exists()
    assert "SIGINT: stopping" in local_run.output()

"""Local mode's pure parts: the `ray start` line, process discovery, Serve progress, inventory, manifests."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ndif_operator.api.v1alpha1 import GIB
from ndif_operator.local.inventory import Machine, build_inventory, parse_meminfo, parse_nvidia_smi
from ndif_operator.local.manifests import ManifestError, load_manifests, parse_manifests
from ndif_operator.local.ray_head import HEAD_MARKER_ENV, RayHeadSpec, RayPorts, processes_of, start_command, start_env
from ndif_operator.local.serve_rest import ServeRestClient, ServeRestError, all_running, app_progress
from ndif_operator.local.table import format_table, human_bytes

MANIFEST = """\
apiVersion: ndif.dev/v1alpha1
kind: ModelDeployment
metadata: {name: tiny}
spec:
  model: {repoId: ndif-demo/tiny-llama, source: {localPath: {path: /models/tiny}}, dtype: float32}
"""


def test_start_command_is_loopback_only_with_explicit_ports() -> None:
    spec = RayHeadSpec(num_cpus=2, ports=RayPorts.offset(100))
    cmd = start_command(spec, "ray")
    assert cmd[:4] == ["ray", "start", "--head", "--block"]
    assert "--node-ip-address=127.0.0.1" in cmd and "--dashboard-host=127.0.0.1" in cmd
    assert "--port=6490" in cmd and "--dashboard-port=8365" in cmd
    # The client server must stay below Ray's default worker port range (10002-19999).
    assert "--ray-client-server-port=9901" in cmd
    assert f"--temp-dir={Path('/tmp/ndif-local-6490')}" in cmd
    assert spec.serve_url == "http://127.0.0.1:8100"
    with pytest.raises(ValueError, match="port offset"):
        RayPorts.offset(2000)  # the dashboard would land in Ray's worker port range


def test_clients_use_the_gateway_door_on_loopback() -> None:
    """Local mode renders the gateway's own listener on its shifted fixed port and hands clients that
    URL; Serve's proxy keeps its own port (the REST-applied config and its health)."""
    from ndif_operator.api.naming import GATEWAY_DIRECT_PORT
    from ndif_operator.local import LocalMode, LocalSettings

    settings = LocalSettings(manifests=(), ports=RayPorts.offset(100))
    args = settings.gateway_args()
    assert (args.direct_host, args.direct_port) == ("127.0.0.1", GATEWAY_DIRECT_PORT + 100)
    mode = LocalMode(settings)
    assert mode.ndif_host == f"http://127.0.0.1:{GATEWAY_DIRECT_PORT + 100}"
    assert mode.serve_url == "http://127.0.0.1:8100"


def test_start_env_disables_auth_and_marks_every_process() -> None:
    spec = RayHeadSpec(num_cpus=1, pythonpath=("/repo",), env={"EXTRA": "1"})
    env = start_env(spec, {"PYTHONPATH": "/other", "RAY_AUTH_MODE": "token", "RAY_ADDRESS": "10.0.0.1:6379"})
    assert "RAY_ADDRESS" not in env
    assert env["RAY_AUTH_MODE"] == "disabled"
    assert env["PYTHONPATH"] == "/repo:/other"
    assert env[HEAD_MARKER_ENV] == str(spec.resolved_temp_dir)
    assert env["EXTRA"] == "1"


def test_processes_of_matches_marker_or_session_dir_but_not_siblings(tmp_path: Path) -> None:
    def fake(pid: int, cmdline: list[str], environ: list[str]) -> None:
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in cmdline))
        (d / "environ").write_bytes(b"\0".join(a.encode() for a in environ))

    fake(11, ["ray::ServeReplica"], [f"{HEAD_MARKER_ENV}=/tmp/ndif-local-6390"])
    fake(12, ["raylet", "--session_dir=/tmp/ndif-local-6390/session_x"], [])
    fake(13, ["raylet", "--session_dir=/tmp/ndif-local-63900/session_x"], [f"{HEAD_MARKER_ENV}=/tmp/ndif-local-63900"])
    fake(14, ["bash"], [])
    (tmp_path / "self").mkdir()
    assert processes_of(Path("/tmp/ndif-local-6390"), proc_root=tmp_path) == [11, 12]


DETAILS: dict[str, Any] = {
    "applications": {
        "gateway": {"status": "RUNNING", "deployments": {"NnsightGateway": {
            "status": "HEALTHY", "target_num_replicas": 1, "replicas": [{"state": "RUNNING"}]}}},
        "md-default-tiny": {"status": "DEPLOYING", "message": "", "deployments": {"ModelReplica": {
            "status": "UPDATING", "target_num_replicas": 2, "replicas": [{"state": "STARTING"}]}}},
    }
}


def test_app_progress_summarizes_states_and_replicas() -> None:
    progress = app_progress(DETAILS)
    assert progress["gateway"].deployments == {"NnsightGateway": "HEALTHY 1/1"}
    assert progress["md-default-tiny"].deployments == {"ModelReplica": "UPDATING 0/2"}
    assert all_running(progress, {"gateway"})
    assert not all_running(progress, {"gateway", "md-default-tiny"})
    assert not all_running(progress, {"missing"})
    assert app_progress({}) == {}


@pytest.fixture()
def fake_dashboard() -> Iterator[tuple[str, list[Any]]]:
    """A real HTTP server standing in for the dashboard: records PUTs, answers GET with `state`."""
    calls: list[Any] = []
    state = {"applications": {"a": {"status": "DEPLOY_FAILED", "message": "bad import", "deployments": {
        "ModelReplica": {"status": "DEPLOY_FAILED", "message": "Traceback ...\nOSError: no tokenizer"}}}}}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            body = json.dumps(state).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def do_PUT(self) -> None:
            calls.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            code = 400 if "bad" in calls[-1] else 200
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b"refused" if code == 400 else b"")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", calls
    finally:
        server.shutdown()
        server.server_close()


def test_rest_client_applies_and_reports_failures(fake_dashboard: tuple[str, list[Any]]) -> None:
    url, calls = fake_dashboard
    client = ServeRestClient(url)
    client.apply({"applications": []})
    assert calls == [{"applications": []}]
    with pytest.raises(ServeRestError, match="400: refused"):
        client.apply({"bad": 1})
    with pytest.raises(ServeRestError, match="a: DEPLOY_FAILED: bad import") as failed:
        client.wait_running({"a"}, timeout=5, poll=0.01)
    assert "ModelReplica: Traceback ...\n      OSError: no tokenizer" in str(failed.value)
    with pytest.raises(ServeRestError, match="not RUNNING after"):
        client.wait_running({"b"}, timeout=0.05, poll=0.01)


def test_inventory_gpu_machine_and_cpu_only_machine() -> None:
    gpu = build_inventory(Machine((80 * GIB, 40 * GIB), 64 * GIB), reserved_bytes=4 * GIB)
    group = gpu.inventory.groups[0]
    assert not gpu.cpu_only and gpu.gpus == 2
    assert (group.gpus_per_pod, group.gpu_memory_bytes, group.cpu_memory_bytes) == (2, 40 * GIB, 60 * GIB)
    cpu = build_inventory(Machine((), 24 * GIB), reserved_bytes=4 * GIB)
    group = cpu.inventory.groups[0]
    assert cpu.cpu_only and cpu.gpus == 0
    assert group.gpus_per_pod == 1 and group.gpu_memory_bytes + group.cpu_memory_bytes == 20 * GIB
    with pytest.raises(ValueError, match="reserved"):
        build_inventory(Machine((), 2 * GIB), reserved_bytes=4 * GIB)


def test_parsers() -> None:
    assert parse_meminfo("MemTotal:       16384 kB\nMemFree: 1 kB\n") == 16384 * 1024
    assert parse_nvidia_smi("81559\n81559\n") == (81559 * 1024**2,) * 2
    with pytest.raises(ValueError):
        parse_meminfo("nothing")


def test_manifests_default_namespace_and_validate(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(MANIFEST)
    [md] = load_manifests([tmp_path])
    assert md.metadata["namespace"] == "default"
    assert md.spec.limits.max_queue_depth == 64  # schema defaults applied
    with pytest.raises(ManifestError, match="defined twice"):
        load_manifests([tmp_path, tmp_path / "a.yaml"])
    with pytest.raises(ManifestError, match="expected kind ModelDeployment"):
        parse_manifests("kind: Pod\n", "x.yaml")
    (tmp_path / "b.yml").write_text("kind: ConfigMap\n")  # a directory may hold other kinds: skipped
    skipped: list[str] = []
    assert len(load_manifests([tmp_path], on_skip=skipped.append)) == 1
    assert skipped and "kind 'ConfigMap'" in skipped[0]
    with pytest.raises(ManifestError, match="expected kind ModelDeployment"):
        load_manifests([tmp_path / "b.yml"])  # named explicitly: refused
    with pytest.raises(ManifestError, match=r"spec\.replicas"):
        parse_manifests(MANIFEST + "  replicas: -1\n", "x.yaml")
    with pytest.raises(ManifestError, match="not valid YAML"):
        parse_manifests("a: [", "x.yaml")
    with pytest.raises(ManifestError, match="no ModelDeployment"):
        load_manifests([])


def test_table_formatting() -> None:
    assert human_bytes(None) == "?" and human_bytes(3 * GIB) == "3 GiB" and human_bytes(2048) == "2 KiB"
    text = format_table([("a", "bb")], headers=("X", "Y"))
    assert text.splitlines() == ["X  Y", "a  bb"]


def test_plan_local_renders_a_loopback_cpu_config_with_the_operators_pipeline(tmp_path: Path) -> None:
    from model_runtime.tiny_models import build_tiny_model
    from ndif_operator.api.naming import GATEWAY_APP, model_app_name
    from ndif_operator.local.pipeline import plan_local
    from ndif_operator.local.serve_rest import AppProgress
    from ndif_operator.local.table import model_table

    path = build_tiny_model("llama", tmp_path / "tiny")
    text = MANIFEST.replace("/models/tiny", str(path)) + "---\n" + MANIFEST.replace("name: tiny", "name: gone").replace(
        "/models/tiny", str(tmp_path / "missing")
    ).replace("tiny-llama", "missing")
    deployments = parse_manifests(text, "m.yaml")
    local = build_inventory(Machine((), 16 * GIB), reserved_bytes=2 * GIB)
    planned = plan_local(deployments, local, serve_port=8123)
    app = model_app_name("default", "tiny")
    assert planned.expected_apps == {GATEWAY_APP, app}
    assert planned.config["http_options"] == {"host": "127.0.0.1", "port": 8123}
    assert planned.config["proxy_location"] == "HeadOnly"
    [model_app] = [a for a in planned.config["applications"] if a["name"] == app]
    actor = model_app["deployments"][0]["ray_actor_options"]
    assert actor["num_cpus"] == 0 and actor["num_gpus"] == 0  # CPU only: never wait for a GPU or a core
    assert model_app["args"]["gpus_per_replica"] == 0
    assert planned.estimates["default/tiny"].weights_bytes > 0
    assert "default/gone" in planned.estimate_errors  # an unreadable checkpoint is planned unsized
    table = model_table(planned, {app: AppProgress(app, "RUNNING", "", {})})
    [row] = [line for line in table.splitlines() if line.startswith("default/tiny ")]
    assert "Hot" in row and "RUNNING" in row
    assert "unsized" in table and "no GPU here" in table


def test_first_signal_raises_stopped_and_later_ones_are_ignored() -> None:
    import os
    import signal
    import time

    from ndif_operator.local.embedded import Stopped, stop_on_signals

    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as stopping:
        with pytest.raises(Stopped, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs at the next bytecode boundary, at the latest here
        assert stopping.is_set()
        os.kill(os.getpid(), signal.SIGINT)  # during teardown: swallowed, no KeyboardInterrupt
    assert signal.getsignal(signal.SIGTERM) is before


def test_owner_file_and_pid_checks(tmp_path: Path) -> None:
    import os

    from ndif_operator.local.ray_head import pid_alive, read_owner

    owner = tmp_path / "owner.pid"
    assert read_owner(owner) is None
    owner.write_text("not a pid\n")
    assert read_owner(owner) is None
    owner.write_text(f"{os.getpid()}\n")
    assert read_owner(owner) == os.getpid() and pid_alive(os.getpid())
    assert not pid_alive(2**22 + 12345)  # above Linux's pid_max: never a live process


def test_local_mode_sizes_a_bin_checkpoint_with_the_meta_evaluator_subprocess(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from model_runtime.tiny_models import build_tiny_model
    from ndif_operator.evaluation import EstimateCache
    from ndif_operator.local.pipeline import evaluate_all

    path = build_tiny_model("gpt2", tmp_path / "tiny-bin", safe_serialization=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "pytorch_model.bin").write_bytes(b"")
    text = MANIFEST.replace("/models/tiny", str(path)) + "---\n" + MANIFEST.replace("name: tiny", "name: bad").replace(
        "/models/tiny", str(broken)).replace("tiny-llama", "bad")
    cache = EstimateCache()
    estimates, errors = evaluate_all(parse_manifests(text, "m.yaml"), cache, now=datetime.now(UTC))
    assert estimates["default/tiny"].method == "MetaDevice" and estimates["default/tiny"].weights_bytes > 0
    assert [e.method for e in cache] == ["MetaDevice"]
    assert "meta-device evaluator failed" in errors["default/bad"]


def test_local_mode_activates_a_warm_model_on_request_and_returns_it(
        tmp_path: Path, fake_dashboard: tuple[str, list[Any]]) -> None:
    from datetime import UTC, datetime, timedelta

    from model_runtime.tiny_models import build_tiny_model
    from ndif_operator.api.naming import model_app_name
    from ndif_operator.local.embedded import LocalMode, LocalSettings
    from ndif_operator.local.pipeline import plan_local

    dashboard, calls = fake_dashboard
    status: dict[str, Any] = {"deployments": {}}
    keys: list[str | None] = []

    class Gateway(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            keys.append(self.headers.get("ndif-api-key"))
            body = json.dumps(status).encode()
            self.send_response(200 if self.path == "/status" else 404)
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        path = build_tiny_model("llama", tmp_path / "tiny")
        text = MANIFEST.replace("/models/tiny", str(path)).replace(
            "spec:\n", "spec:\n  level: Warm\n  activateOnRequest: true\n")
        mode = LocalMode(LocalSettings(manifests=(), activation_ttl_s=60, gateway_api_key="k"), log=lambda _: None)
        mode.deployments = list(parse_manifests(text, "m.yaml"))
        mode.local = build_inventory(Machine((), 16 * GIB), reserved_bytes=2 * GIB)
        mode.plan = plan_local(mode.deployments, mode.local, serve_port=8123, cache=mode.cache)
        mode.rest = ServeRestClient(dashboard)
        gateway = f"http://127.0.0.1:{server.server_address[1]}"
        app = model_app_name("default", "tiny")

        def level() -> str:
            [model] = [a for a in calls[-1]["applications"] if a["name"] == app]
            return str(model["deployments"][0]["user_config"]["level"])

        now = datetime.now(UTC)
        assert not mode.poll_activation(now, gateway_url=gateway) and calls == []
        status["deployments"] = {app: {"deployment": "default/tiny", "activation_requested": True}}
        assert mode.poll_activation(now, gateway_url=gateway) and level() == "Hot"
        assert mode.active == {"default/tiny"} and mode.windows["default/tiny"] == now + timedelta(seconds=60)
        assert not mode.poll_activation(now + timedelta(seconds=30), gateway_url=gateway)  # nothing changed
        later = now + timedelta(seconds=61)
        assert mode.poll_activation(later, gateway_url=gateway) and level() == "Warm" and not mode.active
        assert not mode.poll_activation(later + timedelta(seconds=5), gateway_url=gateway)  # the flag is stale
        status["deployments"][app]["activation_requested_at"] = (later + timedelta(seconds=9)).timestamp()
        assert mode.poll_activation(later + timedelta(seconds=10), gateway_url=gateway) and level() == "Hot"
        assert set(keys) == {"k"} and len(calls) == 3
    finally:
        server.shutdown()
        server.server_close()

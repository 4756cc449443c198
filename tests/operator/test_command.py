"""`ndif-operator run --help`, settings from the environment, and the metrics endpoint."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

from kube_emulator import KubeEmulator, service_account
from loopback import free_port
from operator_harness import ROOT, Cluster, OperatorThread, model_deployment, ray_service, wait_for

from ndif_operator.operator import metrics
from ndif_operator.operator.settings import OperatorSettings


def test_help_explains_the_settings() -> None:
    out = subprocess.run([sys.executable, "-m", "ndif_operator.cli", "run", "--help"], capture_output=True,
                         text=True, check=True, cwd=ROOT, timeout=60).stdout
    for word in ("NDIF_NAMESPACES", "NDIF_RAY_SERVICE", "NDIF_METRICS_PORT", "serveConfigV2", "--liveness"):
        assert word in out


def test_settings_come_from_the_environment(monkeypatch: object) -> None:
    import pytest

    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    monkeypatch.setenv("NDIF_NAMESPACES", "a, b")
    monkeypatch.setenv("NDIF_DEBOUNCE_SECONDS", "2")
    settings = OperatorSettings()
    assert settings.namespace_list == ["a", "b"] and settings.debounce_seconds == 2


def test_metrics_are_served(cluster: Cluster) -> None:
    port = free_port()
    running = OperatorThread(cluster, metrics_port=port).start()
    try:
        cluster.emu.create_sync(ray_service())
        cluster.emu.create_sync(model_deployment("m", "org/m-8g"))
        wait_for(lambda: cluster.condition("m", "Placed").get("status") == "True")

        def scrape() -> str:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            return text if 'ndif_operator_deployments{level="Hot"} 1.0' in text else ""

        text = wait_for(scrape, what="metrics after a pass")
    finally:
        running.stop()
    for name in ("ndif_operator_reconcile_total", "ndif_operator_reconcile_duration_seconds",
                 "ndif_operator_plan_duration_seconds", 'ndif_operator_deployments{level="Hot"}',
                 'ndif_operator_gpus_available{ray_service="ml/ndif"} 2.0', "ndif_operator_rayservice_patches_total"):
        assert name in text
    assert metrics.REGISTRY.get_sample_value("ndif_operator_rayservice_patches_total", {"result": "ok"})


def test_run_command_serves_a_cluster_and_stops_on_sigterm(cluster: Cluster) -> None:
    import os
    import signal

    cluster.emu.create_sync(ray_service())
    cluster.emu.create_sync(model_deployment("m", "org/m-8g"))
    env = dict(os.environ, **cluster.operator_env(), NDIF_METRICS_PORT="0", NDIF_HEALTH_PORT="0",
               NDIF_DEBOUNCE_SECONDS="0.1")
    process = subprocess.Popen([sys.executable, "-m", "ndif_operator.cli", "run"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # The real evaluator sizes the model (or says why not): either way the status is written.
        wait_for(lambda: cluster.condition("m", "Evaluated").get("reason"), timeout=60, what="status from the CLI")
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output


def _run_until_exit(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "ndif_operator.cli", "run"], cwd=ROOT, timeout=60, text=True,
                          env=dict(os.environ, NDIF_METRICS_PORT="0", NDIF_HEALTH_PORT="0", **env),
                          capture_output=True)


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ndif-operator: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_login_failures_exit_1_with_one_line_saying_what_to_fix(cluster: Cluster, tmp_path: Path) -> None:
    env = cluster.operator_env()
    bad_token = tmp_path / "bad-token"
    bad_token.write_text("not-a-token")
    line = _one_error_line(_run_until_exit({**env, "NDIF_KUBE_TOKEN_FILE": str(bad_token)}))
    assert "rejected the credentials (401" in line
    stranger = tmp_path / "stranger-token"
    stranger.write_text(cluster.emu.issue_token(service_account("ml", "default")))
    line = _one_error_line(_run_until_exit({**env, "NDIF_KUBE_TOKEN_FILE": str(stranger)}))
    assert "(403)" in line and 'cannot list resource "modeldeployments"' in line and "files/rbac.yaml" in line
    untrusted = {k: v for k, v in env.items() if k != "NDIF_KUBE_CA_FILE"}
    assert "cannot verify the TLS certificate" in _one_error_line(_run_until_exit(untrusted))
    missing = {**env, "NDIF_KUBE_TOKEN_FILE": str(tmp_path / "absent")}
    assert "cannot read the token file" in _one_error_line(_run_until_exit(missing))


def test_run_without_the_crd_exits_1_with_one_line_saying_what_to_fix(tmp_path: Path) -> None:
    emulator = KubeEmulator()  # serves no ModelDeployments: the CRD is "not installed"
    emulator.start()
    try:
        env = Cluster(emulator, tmp_path).operator_env()
        result = _run_until_exit(env)
    finally:
        emulator.stop()
    assert "kubectl apply -f crds/" in _one_error_line(result)

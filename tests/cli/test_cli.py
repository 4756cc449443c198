"""The command line as a user meets it: `--version`, no tracebacks on a closed pipe, a missing
kubeconfig, a bad inventory or a bad setting; a model directory that does not exist fails `plan`
and `local --exit-when-ready`; `run --help` lists every setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ndif_operator.operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
INVENTORY = ROOT / "inventories" / "example.yaml"


def cli(*args: str, env: dict[str, str] | None = None, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ndif_operator.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={**os.environ, **(env or {})}, **kwargs)  # type: ignore[call-overload]


def _no_traceback(run: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in run.stderr + run.stdout, run.stderr


def test_version() -> None:
    run = cli("--version")
    assert run.returncode == 0 and run.stdout.startswith("ndif-operator 0.")


def test_a_closed_pipe_ends_quietly() -> None:
    read, write = os.pipe()
    os.close(read)  # the reader (`head`) is gone before anything is written
    try:
        run = subprocess.run([sys.executable, "-m", "ndif_operator.cli", "plan", "-f", "examples", "--inventory",
                              str(INVENTORY), "-o", "json"], stdout=write, stderr=subprocess.PIPE, text=True,
                             cwd=ROOT, timeout=120)
    finally:
        os.close(write)
    assert run.returncode == 141, run.stderr  # as if killed by SIGPIPE, like other Unix tools
    assert run.stderr == ""


def test_a_bad_inventory_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "inventory.yaml"
    bad.write_text("workerGroups: [{name: a, pods: [1]}]\n")
    run = cli("plan", "-f", "examples", "--inventory", str(bad))
    _no_traceback(run)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "workerGroups[0]" in run.stderr


def test_a_missing_kubeconfig_is_one_line(tmp_path: Path) -> None:
    run = cli("run", env={"KUBECONFIG": str(tmp_path / "absent"), "NDIF_METRICS_PORT": "0", "NDIF_HEALTH_PORT": "0"})
    _no_traceback(run)
    assert run.returncode == 1 and "kubeconfig" in run.stderr


def test_a_bad_setting_names_its_variable() -> None:
    run = cli("run", env={"NDIF_RESYNC_SECONDS": "soon"})
    _no_traceback(run)
    assert run.returncode == 2 and "NDIF_RESYNC_SECONDS" in run.stderr


def _model_in(tmp_path: Path, directory: Path) -> Path:
    manifest = tmp_path / "md.yaml"
    manifest.write_text(f"""\
apiVersion: ndif.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: mine, namespace: ml}}
spec:
  model:
    repoId: me/mine
    source: {{localPath: {{path: {directory}}}}}
""")
    return manifest


def test_plan_fails_on_a_missing_model_directory(tmp_path: Path) -> None:
    run = cli("plan", "-f", str(_model_in(tmp_path, tmp_path / "absent")), "--inventory", str(INVENTORY))
    _no_traceback(run)
    assert run.returncode == 1 and f"{tmp_path / 'absent'} does not exist" in run.stderr
    assert "ml/mine" in run.stdout  # the plan is still shown


def test_local_exit_when_ready_fails_before_starting_ray(tmp_path: Path) -> None:
    run = cli("local", str(_model_in(tmp_path, tmp_path / "absent")), "--exit-when-ready")
    _no_traceback(run)
    assert run.returncode == 1 and "does not exist" in run.stderr
    assert "Ray" not in run.stdout  # nothing was started


def test_run_help_lists_every_setting() -> None:
    run = cli("run", "--help")
    assert run.returncode == 0
    for name in OperatorSettings.model_fields:
        assert f"NDIF_{name.upper()}" in run.stdout

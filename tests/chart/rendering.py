"""Render the chart with the real Helm SDK (helm-python-sdk bundles Helm v4's Go library) and validate
what comes out: built-in kinds against the Kubernetes OpenAPI schemas of kubernetes-validate,
RayService against KubeRay's CRD schema, monitoring kinds against the Prometheus Operator's."""

from __future__ import annotations

import functools
import gzip
import json
import shutil
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "ndif-operator"
HERE = Path(__file__).resolve().parent
VALUES = HERE / "values"
SCHEMAS = HERE / "schemas"
RELEASE = "ndif-operator"
NAMESPACE = "ndif-system"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a current one.
KUBE_VERSIONS = ("1.29.0", "1.33.0")
VALUES_FILES = sorted(p.stem for p in VALUES.glob("*.yaml"))

helm_python.disable_logging()


def values_of(name: str) -> dict[str, Any]:
    return yaml.safe_load((VALUES / f"{name}.yaml").read_text()) or {}


def render(values: dict[str, Any], chart: Path = CHART) -> dict[str, str]:
    loaded = helm_python.Chart.load(chart)
    try:
        return loaded.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    finally:
        loaded.close()


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(rendered[path]) if d)
    return docs


def chart_with(tmp_path: Path, files: dict[str, str]) -> Path:
    """A copy of the chart (symlinks resolved) with extra files, e.g. a given files/rbac.yaml."""
    copy = tmp_path / "ndif-operator"
    shutil.copytree(CHART, copy, symlinks=False)
    for name, text in files.items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_text(text)
    return copy


@functools.cache
def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    ray = json.loads(gzip.decompress((SCHEMAS / "rayservice-v1-kuberay-1.7.0.json.gz").read_bytes()))
    monitoring = json.loads(gzip.decompress((SCHEMAS / "monitoring-v1-prometheus-operator-0.93.0.json.gz")
                                            .read_bytes()))
    schemas = {("ray.io/v1", "RayService"): ray["openAPIV3Schema"]}
    for kind, schema in monitoring["schemas"].items():
        schemas[("monitoring.coreos.com/v1", kind)] = schema
    return schemas


def validate(doc: dict[str, Any], kube_version: str) -> None:
    """Raise if `doc` is not a valid object of its kind (built-in or one of the CRDs above)."""
    key = (doc["apiVersion"], doc["kind"])
    schema = _crd_schemas().get(key)
    if schema is not None:
        jsonschema.Draft7Validator(schema).validate(doc)
        return
    kubernetes_validate.validate(doc, kube_version, strict=True)

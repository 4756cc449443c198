"""examples/: Kubernetes objects only; the sample RayService carries what the operator reads, never
serveConfigV2, and applying it (or a manifest that does carry serveConfigV2) keeps the plan."""

from __future__ import annotations

from pathlib import Path

import yaml
from kube_emulator import RAY_SERVICE
from operator_harness import ROOT, Cluster, OperatorThread, model_deployment, wait_for

from ndif_operator.api.pinning import kuberay_ray_start_params
from ndif_operator.commands.plan import inventory_from_mapping
from ndif_operator.operator.inventory import read_inventory

SAMPLE = ROOT / "examples" / "ray-service.yaml"


def test_examples_hold_only_kubernetes_objects() -> None:
    files = sorted([*(ROOT / "examples").glob("*.yaml"), *(ROOT / "examples").glob("*.yml")])
    assert SAMPLE in files
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), path
            assert doc["metadata"]["name"], path


def test_the_sample_ray_service_reads_as_the_sample_inventory() -> None:
    sample = yaml.safe_load(SAMPLE.read_text())
    reading = read_inventory(sample)
    assert reading.warnings == ()
    expected = inventory_from_mapping(yaml.safe_load((ROOT / "inventories" / "example.yaml").read_text()))
    assert reading.inventory == expected
    for group in sample["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        assert group["rayStartParams"] == kuberay_ray_start_params(group["groupName"], gpus)
    assert "serveConfigV2" not in sample["spec"]
    assert "NEVER put `serveConfigV2` in this manifest" in SAMPLE.read_text()


def _sample_in(namespace: str, tmp: Path, serve_config: str | None = None) -> Path:
    doc = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"]["namespace"] = namespace
    if serve_config is not None:
        doc["spec"]["serveConfigV2"] = serve_config
    path = tmp / f"rs-{serve_config is not None}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_applying_the_sample_keeps_the_plan_and_a_serve_config_in_a_manifest_is_undone(
        cluster: Cluster, operator: OperatorThread, tmp_path: Path) -> None:
    cluster.kubectl("apply", "-f", str(_sample_in("ml", tmp_path)))
    cluster.emu.create_sync(model_deployment("m", "org/m-10g"))
    wait_for(lambda: "md-ml-m" in cluster.apps(), what="planned")
    planned = (cluster.rs() or {})["spec"]["serveConfigV2"]
    cluster.kubectl("apply", "-f", str(_sample_in("ml", tmp_path)))  # re-applied: the field is not in it
    assert (cluster.rs() or {})["spec"]["serveConfigV2"] == planned
    # A manifest that carries serveConfigV2 (as KubeRay's samples do) overwrites it: restored, with a warning.
    cluster.kubectl("apply", "-f", str(_sample_in("ml", tmp_path, serve_config="")))
    wait_for(lambda: (cluster.rs() or {})["spec"].get("serveConfigV2") == planned, what="restored")
    events = cluster.emu.list_sync(cluster.emu.rtype("", "v1", "events"))
    assert [e for e in events if e["reason"] == "ServeConfigOverwritten" and e["type"] == "Warning"
            and e["involvedObject"]["kind"] == "RayService"]
    assert cluster.emu.get_sync(RAY_SERVICE, "ml", "ndif") is not None

"""On the test API server with the real evaluator: a failed estimate recovers without a restart
(cache ConfigMap watched, retries with backoff), and statuses are written whole, once."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from kube_emulator import CONFIG_MAPS
from operator_harness import (
    MD_TYPE,
    NAMESPACE,
    OPERATOR_NAMESPACE,
    Cluster,
    OperatorThread,
    model_deployment,
    ray_service,
    wait_for,
)

from ndif_operator.api import ModelSpec
from ndif_operator.evaluation import CacheEntry, EstimateCache, cache_key


def _local(name: str, path: Path) -> dict[str, object]:
    manifest = model_deployment(name, f"org/{name}")
    manifest["spec"]["model"].update(dtype="float32", source={"localPath": {"path": str(path)}})  # type: ignore[index]
    return manifest


def _reason(cluster: Cluster, name: str, kind: str) -> str:
    return str(cluster.condition(name, kind).get("reason"))


def test_a_cache_entry_added_by_someone_else_sizes_a_failed_model_at_once(cluster: Cluster, tmp_path: Path) -> None:
    cluster.emu.create_sync(ray_service())
    missing = tmp_path / "not-here"
    cluster.emu.create_sync(_local("m", missing))
    running = OperatorThread(cluster, estimator=None, estimate_retry_initial_seconds=3600).start()
    try:
        wait_for(lambda: _reason(cluster, "m", "Evaluated") == "EstimateFailed", what="failed")
        assert _reason(cluster, "m", "Placed") == "EstimateFailed"  # not "EstimatePending"
        spec = ModelSpec.model_validate((cluster.md("m") or {})["spec"]["model"])
        entry = CacheEntry(key=cache_key(spec), weights_bytes=2**30, parameter_count=2**28,
                           method="SafetensorsHeaders", evaluated_at=datetime(2026, 1, 1, tzinfo=UTC))
        # An admin pre-sizes it in the cache ConfigMap; the hour-long backoff is not waited for.
        cluster.emu.create_sync({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
            "name": "ndif-evaluator-cache", "namespace": OPERATOR_NAMESPACE},
            "data": EstimateCache({entry.key: entry}).to_configmap_data()})
        wait_for(lambda: _reason(cluster, "m", "Evaluated") == "Estimated", what="sized from the cache")
        wait_for(lambda: cluster.condition("m", "Placed").get("status") == "True", what="placed")
    finally:
        running.stop()
    assert cluster.emu.get_sync(CONFIG_MAPS, OPERATOR_NAMESPACE, "ndif-evaluator-cache") is not None


def test_a_checkpoint_that_appears_later_is_sized_by_a_retry(cluster: Cluster, tmp_path: Path) -> None:
    from model_runtime.tiny_models import build_tiny_model

    cluster.emu.create_sync(ray_service())
    later = tmp_path / "later"
    cluster.emu.create_sync(_local("m", later))
    running = OperatorThread(cluster, estimator=None, estimate_retry_initial_seconds=0.5,
                             estimate_retry_max_seconds=1.0).start()
    try:
        wait_for(lambda: _reason(cluster, "m", "Evaluated") == "EstimateFailed", what="failed")
        build_tiny_model("llama", later)
        wait_for(lambda: _reason(cluster, "m", "Evaluated") == "Estimated", what="sized by a retry")
    finally:
        running.stop()


def test_a_cold_model_loses_its_placement_and_an_idle_operator_writes_nothing(cluster: Cluster) -> None:
    cluster.emu.create_sync(ray_service())
    cluster.emu.create_sync(model_deployment("m", "org/m-10g"))
    running = OperatorThread(cluster, resync_seconds=0.3).start()  # many idle passes
    try:
        wait_for(lambda: ((cluster.md("m") or {}).get("status") or {}).get("placement"), what="placed Hot")
        cluster.emu.patch_sync(MD_TYPE, NAMESPACE, "m", {"spec": {"level": "Cold"}})
        wait_for(lambda: ((cluster.md("m") or {}).get("status") or {}).get("level") == "Cold", what="Cold")
        status = (cluster.md("m") or {})["status"]
        assert "placement" not in status and status["replicas"] == 0
        writes = len(cluster.emu.requests("PATCH", r"/modeldeployments/m/status$"))
        passes = len(cluster.emu.requests("GET", r"/rayservices/ndif$"))
        wait_for(lambda: len(cluster.emu.requests("GET", r"/rayservices/ndif$")) >= passes + 5, what="idle passes")
        assert len(cluster.emu.requests("PATCH", r"/modeldeployments/m/status$")) == writes
    finally:
        running.stop()

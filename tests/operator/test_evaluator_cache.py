"""The evaluator cache ConfigMap: loaded at start, written back once per pass, conflicts re-read."""

from __future__ import annotations

import asyncio
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kube_emulator import CONFIG_MAPS, KubeEmulator
from operator_harness import (
    MD_TYPE,
    NAMESPACE,
    Cluster,
    OperatorThread,
    deploy_local_checkpoint,
    wait_for,
)

from ndif_operator.evaluation import CacheEntry, EstimateCache, configmap_key
from ndif_operator.operator.cache_store import CacheStore
from ndif_operator.operator.kube import KubeApi

CACHE_NS, CACHE_NAME = "ndif-system", "ndif-evaluator-cache"


def _entry(key: str) -> CacheEntry:
    return CacheEntry(key=key, weights_bytes=1000, parameter_count=500, method="SafetensorsHeaders",
                      evaluated_at=datetime(2026, 1, 1, tzinfo=UTC))


def _cache_writes(cluster: Cluster) -> int:
    return len([r for method in ("POST", "PATCH") for r in cluster.emu.requests(method, r"/configmaps")
                if r.status in (200, 201)])


@pytest.mark.slow
def test_real_evaluator_sizes_a_checkpoint_and_a_restart_reads_the_cache(cluster: Cluster, tmp_path: Path) -> None:
    checkpoint = tmp_path / "tiny-llama"
    deploy_local_checkpoint(cluster, checkpoint)
    running = OperatorThread(cluster, estimator=None).start()
    try:
        wait_for(lambda: cluster.condition("tiny", "Placed").get("status") == "True", what="Placed")
        wait_for(lambda: cluster.emu.get_sync(CONFIG_MAPS, CACHE_NS, CACHE_NAME), what="cache ConfigMap")
    finally:
        running.stop()
    config_map = cluster.emu.get_sync(CONFIG_MAPS, CACHE_NS, CACHE_NAME)
    assert config_map is not None and len(config_map["data"]) == 1
    stored = json.loads(next(iter(config_map["data"].values())))
    assert stored["method"] == "SafetensorsHeaders" and stored["evaluatedAt"]
    assert stored["key"].startswith(f"file:{checkpoint}@main#float32")
    estimate = (cluster.md("tiny") or {})["status"]["estimate"]
    file_bytes = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    assert 0.5 * file_bytes <= estimate["weightsBytes"] <= file_bytes  # headers sized, weights not read
    assert estimate["totalBytes"] > estimate["weightsBytes"]
    assert "md-ml-tiny" in cluster.apps()
    assert stored["weightsBytes"] == estimate["weightsBytes"]
    writes = _cache_writes(cluster)
    assert writes == 1  # created once; the later passes found nothing new

    # Gone checkpoint + new generation: only the ConfigMap can size it after the restart.
    shutil.rmtree(checkpoint)
    cluster.emu.patch_sync(MD_TYPE, NAMESPACE, "tiny", {"spec": {"priority": 5}})
    running = OperatorThread(cluster, estimator=None).start()
    try:
        wait_for(lambda: (cluster.md("tiny") or {}).get("status", {}).get("observedGeneration") == 2,
                 what="generation 2 planned")
    finally:
        running.stop()
    evaluated = cluster.condition("tiny", "Evaluated")
    assert (evaluated["status"], evaluated["reason"]) == ("True", "Estimated")
    assert (cluster.md("tiny") or {})["status"]["estimate"]["weightsBytes"] == estimate["weightsBytes"]
    assert _cache_writes(cluster) == writes


def test_store_merges_after_a_conflict_and_skips_unchanged(tmp_path: Path) -> None:
    emulator = KubeEmulator()
    emulator.start()
    try:
        asyncio.run(_conflict_scenario(emulator, Cluster(emulator, tmp_path)))
    finally:
        emulator.stop()


async def _conflict_scenario(emulator: KubeEmulator, cluster: Cluster) -> None:
    api = KubeApi.connect(cluster.login())
    try:
        store = CacheStore(api, CACHE_NS, CACHE_NAME)
        await store.load()  # missing: empty, created on the first save
        await store.save()
        assert emulator.get_sync(CONFIG_MAPS, CACHE_NS, CACHE_NAME) is None and store.writes == 0
        store.cache.put(_entry("a"))
        await store.save()
        assert store.writes == 1
        # Another writer adds "b" behind our back: our conditional patch gets 409, re-reads, keeps both.
        other = EstimateCache({"b": _entry("b")}).to_configmap_data()
        emulator.patch_sync(CONFIG_MAPS, CACHE_NS, CACHE_NAME, {"data": other})
        store.cache.put(_entry("c"))
        await store.save()
        data = (emulator.get_sync(CONFIG_MAPS, CACHE_NS, CACHE_NAME) or {})["data"]
        assert set(data) == {configmap_key(k) for k in "abc"}
        assert store.cache.get("b") is not None and store.writes == 2
        conflicts = [r for r in emulator.requests("PATCH", "/configmaps/") if r.status == 409]
        assert len(conflicts) == 1
        await store.save()
        assert store.writes == 2  # nothing changed: no request
    finally:
        await api.close()

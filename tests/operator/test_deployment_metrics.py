"""Per-ModelDeployment gauges: wanted vs granted level (alertable), GPU memory of a Hot replica,
level changes; series of deleted objects go away."""

from __future__ import annotations

from ndif_operator.operator import metrics


def _value(name: str, **labels: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, labels)


def test_wanted_and_granted_levels() -> None:
    key = {"namespace": "t-metrics", "modeldeployment": "llama"}
    hot = {"level": "Hot", "estimate": {"totalBytes": 20 * 2**30}, "placement": {"gpusPerReplica": 0.5}}
    metrics.observe_deployment("t-metrics", "llama", "Hot", hot)
    assert _value("ndif_operator_modeldeployment_wanted_level", **key) == 2
    assert _value("ndif_operator_modeldeployment_granted_level", **key) == 2
    assert _value("ndif_operator_modeldeployment_gpu_memory_bytes", **key) == 20 * 2**30
    assert _value("ndif_operator_modeldeployment_gpus_per_replica", **key) == 0.5
    before = _value("ndif_operator_level_changes_total", from_level="Hot", to_level="Warm") or 0
    metrics.observe_deployment("t-metrics", "llama", "Hot", {**hot, "level": "Warm"})
    assert _value("ndif_operator_modeldeployment_granted_level", **key) == 1  # wanted 2 > granted 1: alert
    assert _value("ndif_operator_modeldeployment_gpu_memory_bytes", **key) == 0
    assert _value("ndif_operator_level_changes_total", from_level="Hot", to_level="Warm") == before + 1
    metrics.observe_deployment("t-metrics", "new", "Hot", {})
    assert _value("ndif_operator_modeldeployment_granted_level", namespace="t-metrics", modeldeployment="new") == -1
    metrics.keep_deployments([("t-metrics", "new")])
    assert _value("ndif_operator_modeldeployment_wanted_level", **key) is None
    assert _value("ndif_operator_modeldeployment_wanted_level", namespace="t-metrics", modeldeployment="new") == 2

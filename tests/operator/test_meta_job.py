"""Checkpoints without safetensors: the operator sizes them with a meta-device evaluator Job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kube_emulator import CONFIG_MAPS, JOBS, PODS
from operator_harness import (
    ROOT,
    Cluster,
    OperatorThread,
    deploy_local_checkpoint,
    model_deployment,
    ray_service,
    wait_for,
)

from ndif_operator.api import ModelSpec
from ndif_operator.operator.meta_job import JOB_LABEL, TERMINATION_LOG, job_manifest, job_name, job_outcome

OPERATOR_NS = "ndif-system"


def _jobs(cluster: Cluster) -> list[dict[str, Any]]:
    return cluster.emu.list_sync(JOBS)


def _kubelet_runs(cluster: Cluster, job: dict[str, Any], tmp: Path) -> None:
    """What the Job controller and kubelet would do: one pod runs the container's command for real,
    and its termination message (the file the evaluator wrote) lands in the pod's status."""
    template = job["spec"]["template"]
    container = template["spec"]["containers"][0]
    log = tmp / "termination-log"
    args = [str(log) if a == TERMINATION_LOG else a for a in container["args"]]
    command = [sys.executable if c == "python" else c for c in container["command"]]
    result = subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    name = job["metadata"]["name"]
    namespace = job["metadata"]["namespace"]
    cluster.emu.create_sync({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": f"{name}-x7k2p", "namespace": namespace, "labels": template["metadata"]["labels"]},
        "spec": template["spec"]})
    terminated = {"exitCode": result.returncode, "reason": "Completed" if result.returncode == 0 else "Error",
                  "message": log.read_text(), "finishedAt": "2026-01-01T00:00:00Z"}
    cluster.emu.patch_sync(PODS, namespace, f"{name}-x7k2p", {"status": {"phase": "Succeeded", "containerStatuses": [{
        "name": container["name"], "image": container["image"], "imageID": "", "ready": False, "restartCount": 0,
        "state": {"terminated": terminated}}]}}, subresource="status")
    kind = "Complete" if result.returncode == 0 else "Failed"
    cluster.emu.patch_sync(JOBS, namespace, name, {"status": {
        "succeeded": int(result.returncode == 0), "failed": int(result.returncode != 0),
        "conditions": [{"type": kind, "status": "True"}]}}, subresource="status")


@pytest.mark.slow
def test_bin_checkpoint_is_sized_by_a_job_once_across_restarts(cluster: Cluster, tmp_path: Path) -> None:
    checkpoint = tmp_path / "tiny-bin"
    deploy_local_checkpoint(cluster, checkpoint, repo="org/tiny-bin", safe_serialization=False)
    assert not list(checkpoint.glob("*.safetensors"))
    settings = {"estimator": None, "runtime_image": "ndif/runtime:test", "pending_poll_seconds": 0.3}
    running = OperatorThread(cluster, **settings).start()
    try:
        wait_for(lambda: cluster.condition("tiny", "Evaluated").get("reason") == "EstimatePending", what="pending")
        wait_for(lambda: _jobs(cluster), what="evaluator Job")
    finally:
        running.stop()
    message = cluster.condition("tiny", "Evaluated")["message"]
    assert "meta device" in message and "ndif-meta-eval-" in message
    # A restarted operator finds its Job: still one, created once.
    running = OperatorThread(cluster, **settings).start()
    try:
        wait_for(lambda: len(cluster.emu.requests("GET", r"/jobs/ndif-meta-eval-")) >= 3, what="Job polled")
        jobs = _jobs(cluster)
        assert len(jobs) == 1 and jobs[0]["metadata"]["namespace"] == OPERATOR_NS
        assert len([r for r in cluster.emu.requests("POST", r"/jobs") if r.status == 201]) == 1
        container = jobs[0]["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == "ndif/runtime:test" and container["args"][-1] == str(checkpoint)
        assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert cluster.md("tiny") is not None and "Placed" in {
            c["type"] for c in (cluster.md("tiny") or {})["status"]["conditions"]}
        _kubelet_runs(cluster, jobs[0], tmp_path)
        wait_for(lambda: cluster.condition("tiny", "Evaluated").get("status") == "True", what="Evaluated")
        wait_for(lambda: cluster.condition("tiny", "Placed").get("status") == "True", what="Placed")
        wait_for(lambda: cluster.emu.get_sync(CONFIG_MAPS, OPERATOR_NS, "ndif-evaluator-cache"), what="cache")
    finally:
        running.stop()
    status = (cluster.md("tiny") or {})["status"]
    assert status["estimate"]["method"] == "MetaDevice"
    weights = sum(p.stat().st_size for p in checkpoint.glob("*.bin"))
    assert 0.5 * weights <= status["estimate"]["weightsBytes"] <= 1.1 * weights
    stored = [json.loads(v) for v in (cluster.emu.get_sync(CONFIG_MAPS, OPERATOR_NS, "ndif-evaluator-cache")
                                      or {})["data"].values()]
    assert [s["method"] for s in stored] == ["MetaDevice"] and "md-ml-tiny" in cluster.apps()


def test_a_failed_job_reports_the_pods_message(cluster: Cluster, tmp_path: Path) -> None:
    checkpoint = tmp_path / "broken-bin"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")  # no model_type: transformers cannot build it
    (checkpoint / "pytorch_model.bin").write_bytes(b"")
    cluster.emu.create_sync(ray_service())
    manifest = model_deployment("broken", "org/broken-bin")
    manifest["spec"]["model"]["source"] = {"localPath": {"path": str(checkpoint)}}
    cluster.emu.create_sync(manifest)
    running = OperatorThread(cluster, estimator=None, pending_poll_seconds=0.3).start()
    try:
        wait_for(lambda: _jobs(cluster), what="evaluator Job")
        _kubelet_runs(cluster, _jobs(cluster)[0], tmp_path)
        wait_for(lambda: cluster.condition("broken", "Evaluated").get("reason") == "EstimateFailed", what="failed")
    finally:
        running.stop()
    message = cluster.condition("broken", "Evaluated")["message"]
    assert "failed" in message and "Error" in message and "delete the Job to retry" in message
    assert cluster.emu.get_sync(CONFIG_MAPS, OPERATOR_NS, "ndif-evaluator-cache") is None


def _job(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "ndif-meta-eval-x"}, "status": status}


def _pod(code: int, message: str, finished: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    return {"status": {"containerStatuses": [{"state": {"terminated": {
        "exitCode": code, "message": message, "finishedAt": finished}}}]}}


def test_job_outcome_reads_termination_messages() -> None:
    assert not job_outcome(_job(active=1), []).done
    done = job_outcome(_job(succeeded=1), [_pod(0, '{"v":1}\n')])
    assert done.done and done.output.strip() == '{"v":1}' and not done.failure
    gave_up = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]
    failed = job_outcome(_job(failed=2, conditions=gave_up),
                         [_pod(1, "first", "2026-01-01T00:00:00Z"),
                          _pod(1, '{"error":"OSError: no config"}', "2026-01-01T00:01:00Z")])
    assert failed.done and "OSError: no config" in failed.failure
    silent = job_outcome(_job(conditions=[{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]), [])
    assert "DeadlineExceeded" in silent.failure
    assert "no termination message" in job_outcome(_job(succeeded=1), []).failure


def test_job_manifest_per_source() -> None:
    hub = ModelSpec.model_validate({"repoId": "org/m", "revision": "v2", "source": {"huggingFace": {
        "endpoint": "https://mirror", "tokenSecret": "hf"}}})
    job = job_manifest(hub, "hf:org/m@v2#bfloat16", namespace="ops", image="img:1")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][-1] == "org/m" and ["--revision", "v2"] == container["args"][4:6]
    assert {"name": "HF_ENDPOINT", "value": "https://mirror"} in container["env"]
    assert job["metadata"]["name"] == job_name("hf:org/m@v2#bfloat16") and len(job["metadata"]["name"]) <= 63
    assert job["spec"]["template"]["metadata"]["labels"][JOB_LABEL] == job["metadata"]["name"]
    s3 = ModelSpec.model_validate({"repoId": "org/m", "source": {"s3": {"bucket": "bkt", "prefix": "a/b/",
                                                                        "credentialsSecret": "aws"}}})
    container = job_manifest(s3, "k", namespace="ops", image="i")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][-1] == "s3://bkt/a/b" and container["envFrom"] == [{"secretRef": {"name": "aws"}}]

"""The meta-device evaluator as a Kubernetes Job: its manifest, and what its pods say. Pure.

The operator never imports torch, so a checkpoint without safetensors is sized by
`model_runtime.meta_evaluator` in a Job from the runtime image. One Job per evaluator cache key,
named from a hash of the key: a restarted operator finds (409, or a get) the Job it started
before instead of starting another. The result travels in the pod's termination message (the
evaluator writes its one JSON line to /dev/termination-log; `FallbackToLogsOnError` makes the
kubelet use the log tail if it could not). Finished Jobs stay for `ttlSecondsAfterFinished`, so a
failure is reported until then, and a later pass may start a fresh one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from ndif_operator.api import ModelSpec
from ndif_operator.evaluation.meta_command import META_EVALUATOR_MODULE, meta_evaluator_args

CACHE_KEY_ANNOTATION = "ndif.dev/cache-key"
JOB_LABEL = "ndif.dev/meta-evaluator"
TERMINATION_LOG = "/dev/termination-log"
_TTL_SECONDS = 86400
_DEADLINE_SECONDS = 1800


def job_name(key: str) -> str:
    """A DNS-1123 name unique per cache key (and short enough for the `job-name` pod label)."""
    return f"ndif-meta-eval-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def job_manifest(model: ModelSpec, key: str, *, namespace: str, image: str,
                 service_account: str | None = None) -> dict[str, Any]:
    name = job_name(key)
    container: dict[str, Any] = {
        "name": "meta-evaluator",
        "image": image,
        "command": ["python", "-m", META_EVALUATOR_MODULE],
        "args": meta_evaluator_args(model, key, termination_log=TERMINATION_LOG),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        # Meta device: no weights are read or allocated; config + module tree fit in little memory.
        "resources": {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
        "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
    }
    volumes: list[dict[str, Any]] = []
    src = model.source
    if src.local_path is not None:
        # The path is on every node that may host the model: mount it at the same place, read-only.
        volumes.append({"name": "checkpoint", "hostPath": {"path": src.local_path.path, "type": "Directory"}})
        container["volumeMounts"] = [{"name": "checkpoint", "mountPath": src.local_path.path, "readOnly": True}]
    elif src.s3 is not None and src.s3.credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": src.s3.credentials_secret}}]
    elif src.hugging_face is not None:
        if src.hugging_face.endpoint:
            container["env"].append({"name": "HF_ENDPOINT", "value": src.hugging_face.endpoint})
        if src.hugging_face.token_secret:
            container["env"].append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
                "name": src.hugging_face.token_secret, "key": "token"}}})
    pod_spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    if volumes:
        pod_spec["volumes"] = volumes
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    labels = {"app.kubernetes.io/managed-by": "ndif-operator", JOB_LABEL: name}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": labels,
                     "annotations": {CACHE_KEY_ANNOTATION: key}},
        "spec": {
            "backoffLimit": 1,
            "activeDeadlineSeconds": _DEADLINE_SECONDS,
            "ttlSecondsAfterFinished": _TTL_SECONDS,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """`done` False: still running. Else `output` (the evaluator's line) or `failure` (why not)."""

    done: bool
    output: str = ""
    failure: str = ""


def _condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return dict(cond)
    return None


def _termination_messages(pods: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(exit code, message) of each terminated evaluator container, newest pod last."""
    found: list[tuple[str, int, str]] = []
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (status.get("state") or {}).get("terminated") or {}
            if terminated:
                found.append((str(terminated.get("finishedAt") or ""), int(terminated.get("exitCode") or 0),
                              str(terminated.get("message") or "")))
    return [(code, message) for _, code, message in sorted(found)]


def job_outcome(job: dict[str, Any], pods: list[dict[str, Any]]) -> JobOutcome:
    status = job.get("status") or {}
    messages = _termination_messages(pods)
    if _condition(job, "Complete") or int(status.get("succeeded") or 0) > 0:
        succeeded = [m for code, m in messages if code == 0 and m.strip()]
        if succeeded:
            return JobOutcome(done=True, output=succeeded[-1])
        return JobOutcome(done=True, failure=f"Job {job['metadata']['name']} completed but its pod left no "
                                             "termination message")
    failed = _condition(job, "Failed")
    if failed:
        last = messages[-1][1].strip() if messages else ""
        why = last or str(failed.get("message") or failed.get("reason") or "failed")
        return JobOutcome(done=True, failure=f"meta-device evaluator Job {job['metadata']['name']} failed: "
                                             f"{why[:800]}")
    return JobOutcome(done=False)

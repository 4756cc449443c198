"""The emulated API server keeps the Kubernetes semantics the operator relies on (real HTTP, real clients)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from kube_emulator import RAY_SERVICE, KubeEmulator
from operator_harness import MD_TYPE, NAMESPACE, Cluster, model_deployment, ray_service

BASE = f"/apis/ndif.dev/v1alpha1/namespaces/{NAMESPACE}/modeldeployments"


def call(emulator: KubeEmulator, method: str, path: str, body: Any = None,
         content_type: str = "application/json", token: str | None = None) -> tuple[int, Any]:
    """A request over TLS as the admin (or the holder of `token`; "" sends no credentials)."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": content_type, **(emulator.auth_headers(token) if token != "" else {})}
    request = urllib.request.Request(emulator.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10, context=emulator.client_ssl_context()) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_create_defaults_validation_and_conflicts(cluster: Cluster) -> None:
    emu = cluster.emu
    code, created = call(emu, "POST", BASE, {**model_deployment("m", "org/m"), "status": {"phase": "Forged"}})
    assert code == 201 and created["metadata"]["generation"] == 1 and created["metadata"]["uid"]
    assert "status" not in created  # the status subresource owns status
    assert created["spec"]["replicas"] == 1 and created["spec"]["limits"]["maxQueueDepth"] == 64  # defaults
    assert call(emu, "POST", BASE, model_deployment("m", "org/m"))[0] == 409
    code, invalid = call(emu, "POST", BASE, model_deployment("x", "org/x", replicas=-1))
    assert code == 422 and "spec.replicas" in invalid["message"]
    # CEL transition rule: repoId is immutable.
    code, body = call(emu, "PATCH", f"{BASE}/m", {"spec": {"model": {"repoId": "org/other"}}},
                      "application/merge-patch+json")
    assert code == 422 and "immutable" in body["message"]
    # Stale resourceVersion → 409; JSON-patch test failure → 422 (what kopf relies on).
    rv = created["metadata"]["resourceVersion"]
    call(emu, "PATCH", f"{BASE}/m", {"spec": {"replicas": 2}}, "application/merge-patch+json")
    stale = {"metadata": {"resourceVersion": rv}, "spec": {"replicas": 3}}
    assert call(emu, "PATCH", f"{BASE}/m", stale, "application/merge-patch+json")[0] == 409
    test_op = [{"op": "test", "path": "/metadata/resourceVersion", "value": rv},
               {"op": "replace", "path": "/spec/replicas", "value": 4}]
    assert call(emu, "PATCH", f"{BASE}/m", test_op, "application/json-patch+json")[0] == 422
    assert call(emu, "PATCH", f"{BASE}/m", {"spec": {}}, "application/apply-patch+yaml")[0] == 400  # no manager
    current = emu.get_sync(MD_TYPE, NAMESPACE, "m") or {}
    assert current["spec"]["replicas"] == 2 and current["metadata"]["generation"] == 2


def test_status_and_scale_subresources_and_generation(cluster: Cluster) -> None:
    emu = cluster.emu
    emu.create_sync(model_deployment("m", "org/m"))
    code, body = call(emu, "PATCH", f"{BASE}/m/status", {"status": {"phase": "Ready"}, "spec": {"replicas": 9}},
                      "application/merge-patch+json")
    assert code == 200 and body["status"]["phase"] == "Ready" and body["spec"]["replicas"] == 1
    assert body["metadata"]["generation"] == 1  # status writes never bump generation
    code, body = call(emu, "PATCH", f"{BASE}/m", {"status": {"phase": "Forged"}, "metadata": {"labels": {"a": "b"}}},
                      "application/merge-patch+json")
    assert body["status"]["phase"] == "Ready" and body["metadata"]["generation"] == 1
    code, scale = call(emu, "GET", f"{BASE}/m/scale")
    assert (code, scale["kind"], scale["spec"]["replicas"]) == (200, "Scale", 1)
    code, scale = call(emu, "PATCH", f"{BASE}/m/scale", {"spec": {"replicas": 3}}, "application/merge-patch+json")
    assert code == 200 and scale["spec"]["replicas"] == 3
    assert (emu.get_sync(MD_TYPE, NAMESPACE, "m") or {})["metadata"]["generation"] == 2


def test_finalizers_hold_deletion_and_no_new_ones_can_be_added(cluster: Cluster) -> None:
    emu = cluster.emu
    emu.create_sync({**model_deployment("m", "org/m"), "metadata": {
        "name": "m", "namespace": NAMESPACE, "finalizers": ["ndif.dev/finalizer"]}})
    code, body = call(emu, "DELETE", f"{BASE}/m")
    assert code == 200 and body["metadata"]["deletionTimestamp"]
    add = {"metadata": {"finalizers": ["ndif.dev/finalizer", "other/x"]}}
    assert call(emu, "PATCH", f"{BASE}/m", add, "application/merge-patch+json")[0] == 422
    assert call(emu, "PATCH", f"{BASE}/m", {"metadata": {"finalizers": None}}, "application/merge-patch+json")[0] == 200
    assert emu.get_sync(MD_TYPE, NAMESPACE, "m") is None


def test_watch_resumes_from_a_resource_version_and_expires_when_compacted() -> None:
    emu = KubeEmulator([MD_TYPE], history_limit=3)
    emu.start()
    try:
        emu.create_sync({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        first = emu.create_sync(model_deployment("a", "org/a"))
        emu.create_sync(model_deployment("b", "org/b"))
        emu.patch_sync(MD_TYPE, NAMESPACE, "a", {"spec": {"replicas": 2}})
        rv = first["metadata"]["resourceVersion"]
        url = f"{emu.url}{BASE}?watch=true&resourceVersion={rv}&timeoutSeconds=1"
        request = urllib.request.Request(url, headers=emu.auth_headers())
        with urllib.request.urlopen(request, timeout=10, context=emu.client_ssl_context()) as response:
            events = [json.loads(line) for line in response.read().splitlines()]
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "b"), ("MODIFIED", "a")]
        for i in range(4):
            emu.patch_sync(MD_TYPE, NAMESPACE, "b", {"spec": {"replicas": i + 2}})
        with urllib.request.urlopen(request, timeout=10, context=emu.client_ssl_context()) as response:
            (expired,) = [json.loads(line) for line in response.read().splitlines()]
        assert expired["type"] == "ERROR" and expired["object"]["code"] == 410
    finally:
        emu.stop()


def test_kubectl_table_and_ray_service_columns(cluster: Cluster) -> None:
    cluster.emu.create_sync(ray_service())
    cluster.emu.patch_sync(RAY_SERVICE, NAMESPACE, "ndif", {"status": {"serviceStatus": "Running",
                                                                      "numServeEndpoints": 2}},
                           subresource="status")
    out = cluster.kubectl("get", "rayservices", "-n", NAMESPACE).stdout
    assert out.split()[:4] == ["NAME", "SERVICE", "STATUS", "NUM"] and "Running" in out


@pytest.mark.parametrize("code", [500, 503])
def test_injected_faults_answer_before_touching_the_store(cluster: Cluster, code: int) -> None:
    cluster.emu.inject("POST", r"/modeldeployments$", code, times=1)
    assert call(cluster.emu, "POST", BASE, model_deployment("m", "org/m"))[0] == code
    assert cluster.emu.get_sync(MD_TYPE, NAMESPACE, "m") is None
    assert call(cluster.emu, "POST", BASE, model_deployment("m", "org/m"))[0] == 201

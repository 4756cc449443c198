"""Status subresource writes and server-side field managers, as the real API server does them."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from kube_emulator import KubeEmulator
from kube_emulator.fields import from_fields_v1
from operator_harness import Cluster, OperatorThread, model_deployment, ray_service, wait_for
from test_emulator import BASE, call

_MERGE = "application/merge-patch+json"
_APPLY = "application/apply-patch+yaml"


def _owners(obj: dict[str, Any]) -> dict[tuple[str, str, str], set[str]]:
    """(manager, operation, subresource) → dotted fields it owns."""
    return {(e["manager"], e["operation"], e.get("subresource", "")):
            {".".join(p) for p in from_fields_v1(e["fieldsV1"])} for e in obj["metadata"]["managedFields"]}


def _as(emu: KubeEmulator, method: str, path: str, body: Any, content_type: str = "application/json",
        user_agent: str = "test/1.0") -> tuple[int, Any]:
    request = urllib.request.Request(emu.url + path, data=json.dumps(body).encode(), method=method,
                                     headers={"Content-Type": content_type, "User-Agent": user_agent,
                                              **emu.auth_headers()})
    try:
        with urllib.request.urlopen(request, timeout=10, context=emu.client_ssl_context()) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_status_put_replaces_merge_patch_merges_and_both_ignore_the_rest(cluster: Cluster) -> None:
    emu = cluster.emu
    emu.create_sync(model_deployment("m", "org/m"))
    code, body = call(emu, "PATCH", f"{BASE}/m/status", {"status": {"phase": "Pending", "level": "Hot"}}, _MERGE)
    defaults = {"replicas": 0, "readyReplicas": 0, "message": ""}  # the CRD's status defaults, applied on write
    assert code == 200 and body["status"] == {**defaults, "phase": "Pending", "level": "Hot"}
    # Merge patch (RFC 7386): keys it does not mention stay; only null removes one.
    body = call(emu, "PATCH", f"{BASE}/m/status", {"status": {"phase": "Ready"}}, _MERGE)[1]
    assert body["status"] == {**defaults, "phase": "Ready", "level": "Hot"}
    body = call(emu, "PATCH", f"{BASE}/m/status", {"status": {"level": None}}, _MERGE)[1]
    assert body["status"] == {**defaults, "phase": "Ready"}
    # PUT on /status replaces the whole status; spec and metadata in the body are ignored.
    put = {**body, "status": {"level": "Cold"}, "spec": {**body["spec"], "replicas": 5},
           "metadata": {**body["metadata"], "labels": {"x": "y"}}}
    code, after = call(emu, "PUT", f"{BASE}/m/status", put)
    assert code == 200 and after["status"] == {**defaults, "level": "Cold"}
    assert after["spec"]["replicas"] == 1 and "labels" not in after["metadata"]
    assert call(emu, "PUT", f"{BASE}/m/status", put)[0] == 409  # its resourceVersion is stale now
    # A JSON patch `add /status` (what the operator sends) also replaces it whole.
    patch = [{"op": "add", "path": "/status", "value": {"phase": "Failed"}}]
    assert call(emu, "PATCH", f"{BASE}/m/status", patch, "application/json-patch+json")[1]["status"] == {
        **defaults, "phase": "Failed"}


def test_managed_fields_follow_each_writer(cluster: Cluster) -> None:
    emu = cluster.emu
    code, created = _as(emu, "POST", f"{BASE}?fieldManager=alice", model_deployment("m", "org/m", replicas=2))
    assert code == 201
    owners = _owners(created)
    assert set(owners) == {("alice", "Update", "")} and "spec.replicas" in owners["alice", "Update", ""]
    # Without ?fieldManager the manager is the User-Agent up to its first "/".
    code, patched = _as(emu, "PATCH", f"{BASE}/m", {"spec": {"replicas": 3}}, _MERGE, user_agent="kopf/1.45.2")
    owners = _owners(patched)
    assert owners["kopf", "Update", ""] == {"spec.replicas"} and "spec.replicas" not in owners["alice", "Update", ""]
    _, status = _as(emu, "PATCH", f"{BASE}/m/status?fieldManager=bob", {"status": {"phase": "Ready"}}, _MERGE)
    assert "status.phase" in _owners(status)["bob", "Update", "status"]  # with the defaults it brought
    # A no-op write changes nothing, managedFields included.
    again = _as(emu, "PATCH", f"{BASE}/m?fieldManager=carol", {"spec": {"replicas": 3}}, _MERGE)[1]
    assert again["metadata"]["resourceVersion"] == status["metadata"]["resourceVersion"]
    assert ("carol", "Update", "") not in _owners(again)


def test_server_side_apply_conflicts_force_and_removal(cluster: Cluster) -> None:
    emu = cluster.emu
    applied = {"apiVersion": "ndif.dev/v1alpha1", "kind": "ModelDeployment",
               "metadata": {"name": "m", "labels": {"team": "a"}},
               "spec": {"model": {"repoId": "org/m"}, "replicas": 2}}
    code, created = _as(emu, "PATCH", f"{BASE}/m?fieldManager=alice", applied, _APPLY)
    assert code == 201 and _owners(created)["alice", "Apply", ""] >= {"spec.replicas", "metadata.labels.team"}
    _as(emu, "PATCH", f"{BASE}/m?fieldManager=bob", {"spec": {"replicas": 4}}, _MERGE)
    # Re-applying a value bob changed conflicts, naming the field and the manager.
    code, body = _as(emu, "PATCH", f"{BASE}/m?fieldManager=alice", applied, _APPLY)
    assert code == 409 and body["reason"] == "Conflict"
    assert body["message"] == ('Apply failed with 1 conflict: conflict with "bob" using ndif.dev/v1alpha1: '
                               ".spec.replicas")
    assert body["details"]["causes"] == [{"reason": "FieldManagerConflict", "field": ".spec.replicas",
                                          "message": 'conflict with "bob" using ndif.dev/v1alpha1'}]
    # The same value is shared, not a conflict; force takes the field.
    assert _as(emu, "PATCH", f"{BASE}/m?fieldManager=alice", {**applied, "spec": {**applied["spec"], "replicas": 4}},
               _APPLY)[0] == 200
    code, forced = _as(emu, "PATCH", f"{BASE}/m?fieldManager=alice&force=true", applied, _APPLY)
    assert code == 200 and forced["spec"]["replicas"] == 2 and ("bob", "Update", "") not in _owners(forced)
    # A field alice applied before and leaves out now is removed (nobody else owns it).
    dropped = {**applied, "metadata": {"name": "m"}}
    assert "labels" not in _as(emu, "PATCH", f"{BASE}/m?fieldManager=alice", dropped, _APPLY)[1]["metadata"]


def test_the_operator_owns_serve_config_and_kubectl_server_side_apply_conflicts(cluster: Cluster) -> None:
    cluster.emu.create_sync(ray_service())
    running = OperatorThread(cluster).start()
    try:
        cluster.emu.create_sync(model_deployment("m", "org/m-8g"))
        wait_for(lambda: cluster.apps().get("md-ml-m"), what="serve config")
        owners = _owners(cluster.rs() or {})
        assert "spec.serveConfigV2" in owners["ndif-operator", "Update", ""]
        wait_for(lambda: ("ndif-operator", "Update", "status") in _owners(cluster.md("m") or {}), what="status")
        # An admin re-applying a RayService manifest that carries serveConfigV2 (as KubeRay's samples
        # do) conflicts with the operator instead of silently unloading every model.
        manifest = json.dumps(ray_service())
        result = cluster.kubectl("apply", "--server-side", "-f", "-", stdin=manifest, check=False)
        assert result.returncode != 0 and 'conflict with "ndif-operator"' in result.stderr
        assert ".spec.serveConfigV2" in result.stderr
        assert cluster.apps().get("md-ml-m")
        # Without serveConfigV2 the apply goes through and leaves the operator's config alone.
        manifest_without = ray_service()
        del manifest_without["spec"]["serveConfigV2"]
        cluster.kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(manifest_without))
        assert cluster.apps().get("md-ml-m")
        assert ("kubectl", "Apply", "") in _owners(cluster.rs() or {})
    finally:
        running.stop()

"""The emulated API server authenticates and authorises as a real one: TLS, tokens, client
certificates, RBAC from stored roles and bindings (subresources included), Kubernetes-shaped errors."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from kube_emulator import Identity, service_account
from operator_harness import NAMESPACE, OPERATOR_NAMESPACE, Cluster, model_deployment
from test_emulator import BASE, call

_MERGE = "application/merge-patch+json"


def _grant(cluster: Cluster, name: str, rules: list[dict[str, object]], subject: dict[str, str],
           namespace: str | None = NAMESPACE) -> None:
    """A Role (or ClusterRole when `namespace` is None) with `rules`, bound to `subject`."""
    kind = "Role" if namespace else "ClusterRole"
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    cluster.emu.create_sync({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta,
                             "rules": rules})
    cluster.emu.create_sync({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": f"{kind}Binding",
                             "metadata": meta, "subjects": [subject],
                             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name}})


def test_no_or_unknown_token_is_401_with_a_status(cluster: Cluster) -> None:
    for token in ("", "not-issued"):
        code, body = call(cluster.emu, "GET", BASE, token=token)
        assert code == 401 and body == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                        "message": "Unauthorized", "reason": "Unauthorized", "code": 401}
    token = cluster.emu.issue_token(Identity("someone"))
    assert call(cluster.emu, "GET", "/apis", token=token)[0] == 200  # discovery: any authenticated user
    cluster.emu.revoke_token(token)
    assert call(cluster.emu, "GET", "/apis", token=token)[0] == 401


def test_tls_needs_the_servers_ca(cluster: Cluster) -> None:
    assert cluster.emu.url.startswith("https://")
    request = urllib.request.Request(cluster.emu.url + "/version", headers=cluster.emu.auth_headers())
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(request, timeout=10, context=ssl.create_default_context())
    plain = cluster.emu.url.replace("https://", "http://")
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(plain + "/version", timeout=10)


def test_client_certificates_authenticate_by_common_name_and_organisation(cluster: Cluster) -> None:
    assert cluster.emu.pki is not None
    pair = cluster.emu.pki.client("alice", ("system:masters",))
    context = cluster.emu.client_ssl_context()
    assert context is not None
    context.load_cert_chain(pair.cert, pair.key)
    with urllib.request.urlopen(cluster.emu.url + BASE, timeout=10, context=context) as response:
        assert response.status == 200
    assert cluster.emu.log[-1].user == "alice"


def test_rbac_403_names_verb_resource_subresource_and_scope(cluster: Cluster) -> None:
    cluster.emu.create_sync(model_deployment("m", "org/m"))
    who = service_account(NAMESPACE, "editor")
    token = cluster.emu.issue_token(who)
    _grant(cluster, "md-editor", [{"apiGroups": ["ndif.dev"], "resources": ["modeldeployments"],
                                   "verbs": ["get", "list", "patch"]}],
           {"kind": "ServiceAccount", "name": "editor", "namespace": NAMESPACE})
    assert call(cluster.emu, "GET", f"{BASE}/m", token=token)[0] == 200
    assert call(cluster.emu, "PATCH", f"{BASE}/m", {"metadata": {"labels": {"a": "b"}}}, _MERGE, token=token)[0] == 200
    # The status subresource is a resource of its own for RBAC.
    code, body = call(cluster.emu, "PATCH", f"{BASE}/m/status", {"status": {"phase": "x"}}, _MERGE, token=token)
    assert code == 403 and body["reason"] == "Forbidden" and body["details"] == {
        "group": "ndif.dev", "kind": "modeldeployments", "name": "m"}
    assert body["message"] == (
        f'modeldeployments.ndif.dev "m" is forbidden: User "{who.user}" cannot patch resource '
        f'"modeldeployments/status" in API group "ndif.dev" in the namespace "{NAMESPACE}"')
    # A Role grants nothing in other namespaces, nor at the cluster scope.
    code, body = call(cluster.emu, "GET", "/apis/ndif.dev/v1alpha1/modeldeployments", token=token)
    assert code == 403 and body["message"].endswith("at the cluster scope")
    assert call(cluster.emu, "GET", "/apis/ndif.dev/v1alpha1/namespaces/other/modeldeployments",
                token=token)[0] == 403
    assert call(cluster.emu, "DELETE", f"{BASE}/m", token=token)[0] == 403  # verb not granted
    code, body = call(cluster.emu, "GET", "/api/v1/nodes", token=token)
    assert code == 403 and 'in API group ""' in body["message"]


def test_the_chart_rbac_binds_the_operator_service_account(cluster: Cluster) -> None:
    token = cluster.token_file.read_text()
    own = f"/api/v1/namespaces/{OPERATOR_NAMESPACE}/configmaps"
    assert call(cluster.emu, "POST", own, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}},
                token=token)[0] == 201
    # The own-namespace Role does not reach other namespaces; Secrets are read one by one, never listed;
    # nothing may be deleted.
    assert call(cluster.emu, "GET", f"/api/v1/namespaces/{NAMESPACE}/configmaps/c", token=token)[0] == 403
    assert call(cluster.emu, "GET", f"/api/v1/namespaces/{OPERATOR_NAMESPACE}/secrets", token=token)[0] == 403
    assert call(cluster.emu, "DELETE", f"{own}/c", token=token)[0] == 403
    assert call(cluster.emu, "GET", "/apis/ndif.dev/v1alpha1/modeldeployments", token=token)[0] == 200


def test_namespaced_install_grants_only_the_watched_namespaces(tmp_path: Path) -> None:
    from kube_emulator import KubeEmulator
    from operator_harness import MD_TYPE

    emulator = KubeEmulator([MD_TYPE])
    emulator.start()
    try:
        cluster = Cluster(emulator, tmp_path, namespaces=(NAMESPACE,))
        token = cluster.token_file.read_text()
        assert call(emulator, "GET", BASE, token=token)[0] == 200
        assert call(emulator, "GET", "/apis/ndif.dev/v1alpha1/modeldeployments", token=token)[0] == 403
        assert call(emulator, "GET", "/api/v1/nodes", token=token)[0] == 403
    finally:
        emulator.stop()

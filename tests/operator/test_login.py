"""Where the operator's credentials come from (ndif_operator/operator/login.py): each source alone,
then a running operator logging in to the emulated API server with them."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import pytest
from kube_emulator.tls import CertificateAuthority
from operator_harness import OPERATOR_NAMESPACE, Cluster, OperatorThread, model_deployment, ray_service, wait_for

from ndif_operator.operator.login import Login, LoginError
from ndif_operator.operator.settings import OperatorSettings


def _kubeconfig(path: Path, user: dict[str, object], *, server: str = "https://127.0.0.1:6443",
                cluster: dict[str, object] | None = None, extra_context: bool = False) -> Path:
    contexts = [{"name": "main", "context": {"cluster": "c", "user": "u", "namespace": "team"}}]
    if extra_context:
        contexts.append({"name": "other", "context": {"cluster": "c", "user": "u", "namespace": "elsewhere"}})
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "main",
        "clusters": [{"name": "c", "cluster": {"server": server, **(cluster or {})}}],
        "users": [{"name": "u", "user": user}], "contexts": contexts}))
    return path


def _login(environ: dict[str, str], sa_dir: Path | None = None, **settings: object) -> Login:
    return Login(OperatorSettings(**settings), environ=environ,  # type: ignore[arg-type]
                 **({"service_account_dir": sa_dir} if sa_dir else {}))


def test_explicit_url_reads_the_token_file_again_after_rotation(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    ca = CertificateAuthority(tmp_path / "ca")
    login = _login({}, kube_api_url="https://127.0.0.1:1/", kube_token_file=str(token), kube_ca_file=str(ca.cert_path))
    creds = login.resolve()
    assert (creds.server, creds.token, creds.ca_path, creds.insecure) == (
        "https://127.0.0.1:1", "first", str(ca.cert_path), False)
    token.write_text("second")  # the kubelet rotates projected tokens in place
    assert login.current().token == "second"


def test_in_cluster_service_account(tmp_path: Path) -> None:
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("sa-token")
    (sa / "namespace").write_text("ndif-system")
    CertificateAuthority(sa)  # writes sa/ca.crt
    login = _login({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}, sa)
    creds = login.resolve()
    assert (creds.server, creds.token, creds.namespace, creds.insecure) == (
        "https://10.0.0.1:443", "sa-token", "ndif-system", False)
    assert creds.ca_path == str(sa / "ca.crt")
    (sa / "token").write_text("rotated")
    assert login.current().token == "rotated"
    assert _login({"KUBERNETES_SERVICE_HOST": "fd00::1"}, sa).resolve().server == "https://[fd00::1]:443"


def test_in_cluster_without_a_mounted_token_says_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(LoginError, match="automountServiceAccountToken"):
        _login({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, tmp_path).resolve()


def test_kubeconfig_wins_over_in_cluster_and_reads_token_context_namespace(tmp_path: Path) -> None:
    path = _kubeconfig(tmp_path / "config", {"token": "kc-token"}, extra_context=True)
    environ = {"KUBECONFIG": str(path), "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    creds = _login(environ).resolve()
    assert (creds.server, creds.token, creds.namespace) == ("https://127.0.0.1:6443", "kc-token", "team")
    assert "kubeconfig" in creds.source
    assert _login(environ, kube_context="other").resolve().namespace == "elsewhere"


def test_kubeconfig_client_certificate_and_ca_data(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    client = ca.client("alice", ("admins",))
    path = _kubeconfig(tmp_path / "config", {
        "client-certificate-data": base64.b64encode(client.cert.read_bytes()).decode(),
        "client-key-data": base64.b64encode(client.key.read_bytes()).decode()},
        cluster={"certificate-authority-data": base64.b64encode(ca.cert_path.read_bytes()).decode()})
    creds = _login({"KUBECONFIG": str(path)}).resolve()
    assert creds.token is None and not creds.insecure
    assert creds.certificate_path and Path(creds.certificate_path).read_bytes() == client.cert.read_bytes()
    assert creds.private_key_path and creds.ca_path and Path(creds.ca_path).read_bytes() == ca.cert_path.read_bytes()


def test_kubeconfig_exec_plugin_is_run_again_when_its_credential_expires(tmp_path: Path) -> None:
    counter = tmp_path / "count"
    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        "import json, pathlib, datetime\n"
        f"p = pathlib.Path({str(counter)!r})\n"
        "n = int(p.read_text()) + 1 if p.exists() else 1\n"
        "p.write_text(str(n))\n"
        "exp = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=1)).strftime('%Y-%m-%dT%H:%M:%SZ')\n"
        "print(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1', 'kind': 'ExecCredential',\n"
        "                  'status': {'token': f'exec-{n}', 'expirationTimestamp': exp}}))\n")
    path = _kubeconfig(tmp_path / "config", {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable, "args": [str(plugin)],
        "interactiveMode": "Never"}})
    login = _login({"KUBECONFIG": str(path)})
    first = login.resolve().token
    assert first and first.startswith("exec-")
    # It expires within the client's 5-minute skew: the next request runs the plugin again.
    assert login.current().token != first


def test_no_credentials_anywhere_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(LoginError) as info:
        _login({}).resolve()
    assert "\n" not in str(info.value) and "set KUBECONFIG or NDIF_KUBE_API_URL" in str(info.value)


def test_a_broken_kubeconfig_is_one_clear_line(tmp_path: Path) -> None:
    path = _kubeconfig(tmp_path / "config", {"token": "t"})
    with pytest.raises(LoginError) as info:
        _login({"KUBECONFIG": str(path)}, kube_context="missing").resolve()
    assert "\n" not in str(info.value) and "missing" in str(info.value) and str(path) in str(info.value)


# --- logging in to the emulated API server (TLS, tokens, the chart's RBAC) with a running operator ---


def _place_one(cluster: Cluster, running: OperatorThread, name: str) -> None:
    cluster.emu.create_sync(model_deployment(name, f"org/{name}-8g"))
    wait_for(lambda: cluster.condition(name, "Placed").get("status") == "True", what=f"{name} placed")


def _run_with_kubeconfig(cluster: Cluster, path: Path) -> None:
    """The operator logs in from `path` alone (KUBECONFIG, no NDIF_KUBE_*) and places a model."""
    cluster.emu.create_sync(ray_service())
    running = OperatorThread(cluster, environ={"KUBECONFIG": str(path)}, **_NO_URL).start()
    try:
        _place_one(cluster, running, "m")
    finally:
        running.stop()


_NO_URL = {"kube_api_url": None, "kube_token_file": None, "kube_ca_file": None}


def test_operator_logs_in_with_a_kubeconfig_exec_plugin(cluster: Cluster, tmp_path: Path) -> None:
    token = cluster.token_file.read_text()
    plugin = tmp_path / "plugin.py"
    plugin.write_text("import json\nprint(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1', "
                      f"'kind': 'ExecCredential', 'status': {{'token': {token!r}}}}}))\n")
    assert cluster.emu.ca_path is not None
    path = _kubeconfig(tmp_path / "config", {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable, "args": [str(plugin)],
        "interactiveMode": "Never"}}, server=cluster.emu.url,
        cluster={"certificate-authority": str(cluster.emu.ca_path)})
    _run_with_kubeconfig(cluster, path)


def test_operator_logs_in_with_a_kubeconfig_client_certificate(cluster: Cluster, tmp_path: Path) -> None:
    assert cluster.emu.pki is not None and cluster.emu.ca_path is not None
    # The certificate's common name is the user RBAC sees (here the chart's service account's name).
    pair = cluster.emu.pki.client(cluster.operator_identity.user, ("system:authenticated",))
    path = _kubeconfig(tmp_path / "config", {"client-certificate": str(pair.cert), "client-key": str(pair.key)},
                       server=cluster.emu.url, cluster={"certificate-authority": str(cluster.emu.ca_path)})
    _run_with_kubeconfig(cluster, path)
    assert all(e.user == cluster.operator_identity.user for e in cluster.operator_requests())


def test_operator_logs_in_as_the_pods_service_account(cluster: Cluster, tmp_path: Path) -> None:
    """In a pod: KUBERNETES_SERVICE_HOST/PORT and the mounted token, CA and namespace (here a copy)."""
    assert cluster.emu.ca_path is not None
    mounted = tmp_path / "serviceaccount"
    mounted.mkdir()
    (mounted / "token").write_text(cluster.token_file.read_text())
    (mounted / "ca.crt").write_bytes(cluster.emu.ca_path.read_bytes())
    (mounted / "namespace").write_text(OPERATOR_NAMESPACE)
    host, port = cluster.emu.url.removeprefix("https://").rsplit(":", 1)
    cluster.emu.create_sync(ray_service())
    running = OperatorThread(cluster, environ={"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port},
                             service_account_dir=mounted, **_NO_URL).start()
    try:
        _place_one(cluster, running, "m")
    finally:
        running.stop()


def test_a_rotated_token_file_is_picked_up_without_a_restart(cluster: Cluster) -> None:
    cluster.emu.create_sync(ray_service())
    running = OperatorThread(cluster, expect_401=True).start()
    try:
        _place_one(cluster, running, "a")
        old = cluster.token_file.read_text()
        cluster.token_file.write_text(cluster.emu.issue_token(cluster.operator_identity))  # the kubelet rotates
        cluster.emu.revoke_token(old)  # ... and the old token expires
        before = len(cluster.emu.log)
        cluster.emu.close_watches()  # Kopf reconnects with the old token: 401, then it logs in again
        wait_for(lambda: any(e.status == 401 for e in list(cluster.emu.log)[before:]), what="a 401")

        def watching_again() -> bool:
            return any(e.status == 200 and e.attrs is not None and e.attrs.verb == "watch"
                       and e.user == cluster.operator_identity.user for e in list(cluster.emu.log)[before:])

        wait_for(watching_again, what="Kopf's watches back with the new token")
        _place_one(cluster, running, "b")
    finally:
        running.stop()  # no crash, no 403


def test_credentials_revoked_while_running_stop_the_operator_with_one_line(cluster: Cluster) -> None:
    from ndif_operator.operator.login import LoginError

    running = OperatorThread(cluster, expect_401=True).start()
    cluster.emu.revoke_token(cluster.token_file.read_text())  # and nothing replaces it
    cluster.emu.close_watches()
    running.thread.join(60)
    assert not running.thread.is_alive(), "the operator kept running without valid credentials"
    assert isinstance(running.error, LoginError) and "\n" not in str(running.error), running.error
    assert "credentials" in str(running.error)

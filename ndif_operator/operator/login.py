"""How the operator finds its API server and credentials: one source for Kopf and for `KubeApi`.

In order, as controller-runtime operators do:

1. `NDIF_KUBE_API_URL` (explicit, e.g. for tests): the URL, with `NDIF_KUBE_TOKEN_FILE` and
   `NDIF_KUBE_CA_FILE` if set; TLS verified unless `NDIF_KUBE_INSECURE_SKIP_TLS_VERIFY=true`.
2. `$KUBECONFIG` when set (colon-separated files are merged), with `NDIF_KUBE_CONTEXT`.
3. In a pod: the service account (`KUBERNETES_SERVICE_HOST`/`_PORT`, the mounted token and CA).
4. `~/.kube/config`.

Kubeconfig users may carry a token, a token file, a client certificate and key, or an exec
plugin (the `kubernetes` client's loader runs it and re-runs it when its credential expires).
Token files (service account, `NDIF_KUBE_TOKEN_FILE`) are re-read on every request: the kubelet
rotates projected tokens in place. Kopf calls the login again after a 401; that reload is fresh.
Every failure is a `LoginError` whose message is one line that says what to fix.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from kubernetes import client as sync_client
from kubernetes import config as sync_config

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_KUBECONFIG = "~/.kube/config"


class LoginSettings(Protocol):
    kube_api_url: str | None
    kube_token_file: str | None
    kube_ca_file: str | None
    kube_insecure_skip_tls_verify: bool
    kube_context: str | None


class LoginError(Exception):
    """No usable credentials, or the API server refused them: the message says what to fix."""


@dataclass(frozen=True)
class Credentials:
    server: str
    source: str  # where they came from, for error messages
    token: str | None = None
    ca_path: str | None = None
    certificate_path: str | None = None
    private_key_path: str | None = None
    insecure: bool = False
    namespace: str | None = None
    expires: datetime | None = None


def _read_token(path: Path, what: str) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise LoginError(f"cannot read the token file {path} ({what}): {exc.strerror or exc}") from exc
    if not token:
        raise LoginError(f"the token file {path} ({what}) is empty")
    return token


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token if token and scheme.lower() == "bearer" else header


class Login:
    """Resolves credentials once (`resolve`), then serves them with token files re-read."""

    def __init__(self, settings: LoginSettings, *, environ: dict[str, str] | None = None,
                 service_account_dir: Path = SERVICE_ACCOUNT_DIR) -> None:
        self._settings = settings
        self._environ = dict(os.environ if environ is None else environ)
        self._sa_dir = service_account_dir
        self._lock = threading.Lock()
        self._base: Credentials | None = None
        self._token_file: Path | None = None
        self._kubeconfig: Any = None  # the kubernetes client's Configuration, for its refresh hook
        self.last_error: LoginError | None = None  # of the latest resolve(); None after a success

    # --- resolving ------------------------------------------------------------------------------

    def resolve(self) -> Credentials:
        """Fresh credentials from the first source that applies (kubeconfigs reloaded, exec re-run)."""
        try:
            credentials = self._resolve()
        except LoginError as exc:
            self.last_error = exc
            raise
        self.last_error = None
        return credentials

    def _resolve(self) -> Credentials:
        with self._lock:
            settings = self._settings
            self._kubeconfig = None
            self._token_file = None
            if settings.kube_api_url:
                self._base = self._explicit(settings.kube_api_url)
            elif self._environ.get("KUBECONFIG"):
                self._base = self._from_kubeconfig(self._environ["KUBECONFIG"])
            elif self._environ.get("KUBERNETES_SERVICE_HOST"):
                self._base = self._in_cluster()
            elif Path(DEFAULT_KUBECONFIG).expanduser().exists():
                self._base = self._from_kubeconfig(DEFAULT_KUBECONFIG)
            else:
                raise LoginError(
                    "no Kubernetes credentials found: not in a pod (KUBERNETES_SERVICE_HOST unset), KUBECONFIG "
                    f"unset and no {DEFAULT_KUBECONFIG}; set KUBECONFIG or NDIF_KUBE_API_URL")
            return self._current()

    def current(self) -> Credentials:
        """The resolved credentials with token files re-read and expired exec credentials renewed."""
        with self._lock:
            if self._base is None:
                raise LoginError("credentials requested before login")
            return self._current()

    def _current(self) -> Credentials:
        assert self._base is not None
        if self._token_file is not None:
            return replace(self._base, token=_read_token(self._token_file, self._base.source))
        if self._kubeconfig is not None:
            return self._kubeconfig_credentials(self._base)
        return self._base

    def _explicit(self, url: str) -> Credentials:
        settings = self._settings
        source = "NDIF_KUBE_API_URL"
        if settings.kube_token_file:
            self._token_file = Path(settings.kube_token_file)
        ca = settings.kube_ca_file
        if ca and not Path(ca).is_file():
            raise LoginError(f"NDIF_KUBE_CA_FILE {ca} does not exist")
        return Credentials(server=url.rstrip("/"), source=source, ca_path=ca,
                           insecure=settings.kube_insecure_skip_tls_verify)

    def _in_cluster(self) -> Credentials:
        host = self._environ["KUBERNETES_SERVICE_HOST"]
        port = self._environ.get("KUBERNETES_SERVICE_PORT", "443")
        host = f"[{host}]" if ":" in host else host
        token, ca = self._sa_dir / "token", self._sa_dir / "ca.crt"
        source = "the pod's service account"
        if not token.is_file():
            raise LoginError(f"in a pod (KUBERNETES_SERVICE_HOST is set) but {token} is missing: mount the service "
                             "account token (automountServiceAccountToken: true)")
        if not ca.is_file():
            raise LoginError(f"in a pod but the service account CA {ca} is missing")
        namespace_file = self._sa_dir / "namespace"
        namespace = namespace_file.read_text().strip() if namespace_file.is_file() else None
        self._token_file = token
        return Credentials(server=f"https://{host}:{port}", source=source, ca_path=str(ca), namespace=namespace)

    def _from_kubeconfig(self, path: str) -> Credentials:
        context = self._settings.kube_context
        source = f"kubeconfig {path}" + (f" (context {context})" if context else "")
        configuration = sync_client.Configuration()
        try:
            sync_config.load_kube_config(config_file=os.path.expanduser(path), context=context,
                                         client_configuration=configuration, persist_config=False)
        except (sync_config.ConfigException, OSError, ValueError, KeyError) as exc:
            message = " ".join(str(exc).split()) or type(exc).__name__
            raise LoginError(f"cannot use {source}: {message}") from exc
        self._kubeconfig = configuration
        namespace = None
        try:
            contexts, active = sync_config.list_kube_config_contexts(config_file=os.path.expanduser(path))
            chosen = next((c for c in contexts if c["name"] == context), None) if context else active
            namespace = (chosen or {}).get("context", {}).get("namespace")
        except (sync_config.ConfigException, OSError, ValueError, KeyError):
            pass  # the namespace is only a default for Events on cluster objects
        return Credentials(server=str(configuration.host).rstrip("/"), source=source, namespace=namespace,
                           insecure=not configuration.verify_ssl)

    def _kubeconfig_credentials(self, base: Credentials) -> Credentials:
        configuration = self._kubeconfig
        if configuration.refresh_api_key_hook is not None:
            configuration.refresh_api_key_hook(configuration)  # re-runs an exec plugin whose credential expired
        header = configuration.api_key.get("BearerToken") or configuration.api_key.get("authorization")
        if not header and configuration.username:
            raise LoginError(f"{base.source}: basic authentication (username/password) is not supported; "
                             "use a token, a client certificate or an exec plugin")
        token = _bearer(header)
        if not token and not configuration.cert_file:
            raise LoginError(f"{base.source}: the user has no token, client certificate or exec plugin "
                             "that produced one")
        return replace(base, token=token, ca_path=configuration.ssl_ca_cert or None,
                       certificate_path=configuration.cert_file or None,
                       private_key_path=configuration.key_file or None)


def describe_failure(credentials: Credentials, status: int | None, detail: str) -> str:
    """One line for a failed first request: what happened and what to fix."""
    where = f"the API server {credentials.server} (credentials from {credentials.source})"
    detail = " ".join(detail.split())
    if status == 401:
        return (f"{where} rejected the credentials (401 Unauthorized): the token or certificate is invalid or "
                "expired; fix the kubeconfig user or the service account token")
    if status == 403:
        return (f"{where} forbids the operator's first request (403): {detail}; "
                "bind the generated RBAC (charts/ndif-operator/files/rbac.yaml) to this identity")
    if status == 404:
        return (f"{where} does not serve ModelDeployments (404): install the CRD with `kubectl apply -f crds/`")
    if status is None and ("CERTIFICATE_VERIFY_FAILED" in detail or "certificate verify failed" in detail):
        return (f"cannot verify the TLS certificate of {where}: {detail}; give the cluster's CA "
                "(kubeconfig certificate-authority, NDIF_KUBE_CA_FILE)")
    if status is None:
        return f"cannot reach {where}: {detail}"
    return f"{where} answered {status} to the operator's first request: {detail}"

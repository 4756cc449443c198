"""Names the operator and the runtime must agree on (Serve application and deployment names, headers)."""

from __future__ import annotations

import hashlib
import re

GATEWAY_APP = "gateway"
GATEWAY_DEPLOYMENT = "NnsightGateway"
GATEWAY_IMPORT_PATH = "model_runtime.gateway.app:build_app"
MODEL_DEPLOYMENT = "ModelReplica"
MODEL_IMPORT_PATH = "model_runtime.replica.app:build_app"
# The gateway replica's own listener, users' door into it without Serve's proxy (`direct_port` of its
# args): the port the operator renders, local mode serves on and the chart exposes, unless configured.
GATEWAY_DIRECT_PORT = 8001
# The HTTP header nnsight clients (and the operator's own status reads) carry their API key in.
API_KEY_HEADER = "ndif-api-key"

_UNSAFE = re.compile(r"[^a-z0-9-]+")
_MAX_APP_NAME = 63


def model_key(repo_id: str) -> str:
    """The key nnsight clients send for a model: its repo id, lower-cased."""
    return repo_id.lower()


def model_app_name(namespace: str, name: str) -> str:
    """Serve application name of one ModelDeployment: stable, DNS-label-like, unique per object.

    Long names are cut and suffixed with a hash of the full name so that two objects never share
    an application.
    """
    raw = f"md-{namespace}-{name}".lower()
    safe = _UNSAFE.sub("-", raw).strip("-")
    if len(safe) <= _MAX_APP_NAME and safe == raw:
        return safe
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:8]
    return f"{safe[: _MAX_APP_NAME - 9].rstrip('-')}-{digest}"

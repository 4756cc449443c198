"""Operator settings, read from the environment (prefix `NDIF_`), e.g. `NDIF_RAY_SERVICE=ndif`."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ndif_operator.api import GatewayAppArgs
from ndif_operator.api.naming import GATEWAY_DIRECT_PORT
from ndif_operator.rendering import RenderOptions

_SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class LogFormat(StrEnum):
    JSON = "json"
    TEXT = "text"


def _own_namespace() -> str:
    """In a pod, its namespace (mounted with the service account token); elsewhere `ndif-system`."""
    try:
        return _SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "ndif-system"
    except OSError:
        return "ndif-system"


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NDIF_", extra="ignore")

    namespaces: str = Field(
        default="", description="Comma-separated namespaces to watch; empty: all namespaces (cluster-wide)."
    )
    ray_service: str = Field(
        default="ndif", description="RayService (in each ModelDeployment namespace) used when spec.rayService is unset."
    )
    debounce_seconds: float = Field(
        default=0.5, ge=0, description="Quiet time after a change before planning: a burst becomes one pass."
    )
    resync_seconds: float = Field(
        default=300.0, gt=0, description="Plan again at least this often even without events (level-triggered; "
                                         "watches wake it on every change)."
    )
    finalizer: str = Field(default="ndif.dev/finalizer", description="Finalizer that holds a deleted model "
                                                                      "until its Serve app is gone.")
    metrics_port: int = Field(default=9090, ge=0, le=65535, description="Prometheus metrics port; 0 disables.")
    health_port: int = Field(default=8080, ge=0, le=65535,
                             description="Probe port: /healthz (event loop alive), /readyz (watching, passes not "
                                         "failing); 0 disables.")
    unready_after_failing_seconds: float = Field(
        default=300.0, gt=0, description="/readyz fails once every planner pass has failed for this long.",
    )
    kube_api_url: str | None = Field(
        default=None, description="API server URL (tests, development); default: KUBECONFIG, then the pod's "
                                  "service account, then ~/.kube/config.",
    )
    kube_token_file: str | None = Field(
        default=None, description="With NDIF_KUBE_API_URL: a file holding the bearer token (re-read on rotation).",
    )
    kube_ca_file: str | None = Field(
        default=None, description="With NDIF_KUBE_API_URL: the CA bundle that signs the API server's certificate.",
    )
    kube_insecure_skip_tls_verify: bool = Field(
        default=False, description="With NDIF_KUBE_API_URL: do not verify the server's TLS certificate.",
    )
    kube_context: str | None = Field(default=None, description="Kubeconfig context (default: its current one).")
    cpu_only: bool = Field(default=False, description="Render HOT replicas with num_gpus 0 (CPU-only clusters).")
    pin_gpus: bool = Field(default=True, description="Pin each replica and TP rank to its planned pod and GPU "
                           "(worker nodes declare ndif_gpu_<i> resources and the ndif.dev/pod label; "
                           "docs/placement.md). False leaves placement to Ray.")
    replica_num_cpus: float | None = Field(
        default=None, ge=0, description="num_cpus of each model replica (default: Serve's, 1). Keep it above 0 on "
        "a cluster: the chart's Ray head declares no CPU so that no model replica runs where the gateway's "
        "credentials are.",
    )
    gateway_num_cpus: float | None = Field(
        default=None, ge=0, description="num_cpus of each gateway replica (default: 0, so that it fits the Ray head, "
        "where it is pinned and which the chart starts with num-cpus 0).",
    )
    backoff_initial_seconds: float = Field(default=0.5, gt=0, description="First retry delay after an API error.")
    backoff_max_seconds: float = Field(default=30.0, gt=0, description="Cap of the exponential retry delay.")
    read_nodes: bool = Field(default=True, description="Read Nodes for GPU memory labels (needs list on nodes).")
    operator_namespace: str = Field(
        default_factory=lambda: _own_namespace(), min_length=1,
        description="Namespace of the operator's own objects: the evaluator cache ConfigMap and meta-device Jobs "
                    "(default: the pod's own namespace, else ndif-system).",
    )
    runtime_image: str = Field(
        default="ndif/runtime:latest", min_length=1,
        description="Image with model_runtime installed; runs the meta-device evaluator Job for checkpoints "
                    "without safetensors (use the RayService's image).",
    )
    meta_evaluator_service_account: str | None = Field(
        default=None, description="ServiceAccount of the meta-device evaluator Jobs; default: the namespace's.",
    )
    pending_poll_seconds: float = Field(
        default=5.0, gt=0, description="How often to look at a running meta-device evaluator Job.",
    )
    estimate_retry_initial_seconds: float = Field(
        default=10.0, gt=0, description="First retry of a failed size estimate (doubling per failure); a spec "
                                        "change or a change of the evaluator cache ConfigMap retries at once.",
    )
    estimate_retry_max_seconds: float = Field(
        default=600.0, gt=0, description="Cap of the retry delay of a failed size estimate.",
    )
    gateway_url: str = Field(
        default="http://{name}-serve-svc.{namespace}.svc:8000",
        description="Gateway base URL per RayService ({name}, {namespace} filled in); its GET /status says "
                    "which Warm models were requested (activateOnRequest).",
    )
    gateway_api_key: str | None = Field(default=None, description="API key sent to the gateway's /status.")
    activation_ttl_seconds: float = Field(
        default=900.0, gt=0, description="activateOnRequest: how long a requested Warm model stays Hot "
                                         "(at least its minimumDeploymentSeconds).",
    )
    activation_poll_seconds: float = Field(
        default=10.0, gt=0, description="How often to ask the gateway for demand while an activateOnRequest "
                                        "model is Warm.",
    )
    cache_config_map: str = Field(
        default="ndif-evaluator-cache", min_length=1,
        description="ConfigMap (in operator_namespace) that persists evaluator results across restarts.",
    )

    log_format: LogFormat = Field(default=LogFormat.JSON, description="Log lines as JSON objects or plain text.")
    log_level: str = Field(default="INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$", description="Log level.")
    # The gateway's cluster-wide settings, rendered into its application args (chart values `gateway.*`).
    gateway_object_store_bucket: str = Field(
        default="", description="S3 bucket for large results; empty: results stay in the gateway's memory.",
    )
    gateway_object_store_endpoint: str = Field(default="", description="S3 endpoint URL; empty: AWS.")
    gateway_api_keys_dir: str = Field(
        default="", description="Directory (a mounted Secret) of accepted API-key sha256 digests, re-read on "
                                "change; empty: the gateway's env var only.",
    )
    gateway_min_client_version: str = Field(default="", description="Oldest nnsight client accepted; empty: default.")
    gateway_max_request_bytes: int | None = Field(default=None, ge=1, description="Request body limit.")
    gateway_inline_result_max_bytes: int | None = Field(
        default=None, ge=1, description="Results above this go to the object store.",
    )
    gateway_direct_port: int = Field(
        default=GATEWAY_DIRECT_PORT, ge=0, le=65535,
        description="Port of the gateway replica's own HTTP/websocket listener on the Ray head: users' door, with "
                    "no Serve proxy hop; it outlives a replaced gateway replica. 0: only Serve's proxy.",
    )

    def gateway_args(self) -> GatewayAppArgs:
        """The gateway's application args from these settings (unset ones keep the gateway's defaults)."""
        given: dict[str, object] = {
            "object_store_bucket": self.gateway_object_store_bucket or None,
            "object_store_endpoint_url": self.gateway_object_store_endpoint or None,
            "api_key_hashes_dir": self.gateway_api_keys_dir or None,
            "min_nnsight_version": self.gateway_min_client_version or None,
            "max_request_bytes": self.gateway_max_request_bytes,
            "inline_result_max_bytes": self.gateway_inline_result_max_bytes,
            "direct_port": self.gateway_direct_port or None,
        }
        return GatewayAppArgs.model_validate({k: v for k, v in given.items() if v is not None})

    def render_options(self) -> RenderOptions:
        return RenderOptions(cpu_only=self.cpu_only, replica_num_cpus=self.replica_num_cpus,
                             gateway_num_cpus=self.gateway_num_cpus, gateway=self.gateway_args(),
                             pin_gpus=self.pin_gpus,
                             log_encoding="JSON" if self.log_format == LogFormat.JSON else "TEXT")

    @property
    def namespace_list(self) -> list[str]:
        return [n.strip() for n in self.namespaces.split(",") if n.strip()]

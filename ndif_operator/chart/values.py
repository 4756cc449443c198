"""The Helm chart's values, typed: the one source of `values.yaml` and `values.schema.json`.

`ndif-operator generate` writes both into `charts/ndif-operator/` (a test fails on drift), so a
wrong value fails at `helm install` with the field's path, and every value is documented by the
description written here. Names are camelCase, as Helm values are.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from ndif_operator.api.naming import GATEWAY_DIRECT_PORT
from ndif_operator.operator.settings import LogFormat


class _Values(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True,
                              use_attribute_docstrings=False)


Quantities = dict[str, str | int]
NodeSelector = dict[str, str]
Tolerations = list[dict[str, Any]]
Peers = list[dict[str, Any]]  # NetworkPolicyPeer objects
Rules = list[dict[str, Any]]  # NetworkPolicy ingress or egress rules


class PullPolicy(StrEnum):
    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


class ServiceType(StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"


class Image(_Values):
    repository: str = Field(min_length=1, description="Image repository.")
    tag: str = Field(default="", description="Image tag; empty: the chart's appVersion.")
    pull_policy: PullPolicy = Field(default=PullPolicy.IF_NOT_PRESENT, description="imagePullPolicy.")


class Resources(_Values):
    requests: Quantities = Field(default_factory=dict, description="Resource requests (cpu, memory, ...).")
    limits: Quantities = Field(default_factory=dict, description="Resource limits.")


class Watch(_Values):
    namespaced: bool = Field(
        default=False,
        description="Namespaced-only mode: watch only `namespaces` (default: the release namespace) with a Role "
        "in each instead of a ClusterRole. Nodes are then not read (GPU memory comes from the "
        "worker groups' ndif.dev/gpu-memory annotation or nodeSelector).",
    )
    namespaces: list[str] = Field(
        default_factory=list,
        description="Namespaces to watch. Empty: every namespace (cluster-wide), or only the release namespace "
        "when `namespaced` is true.",
    )


class OperatorConfig(_Values):
    ray_service: str = Field(default="ndif", min_length=1,
                             description="RayService used by ModelDeployments that do not name one.")
    cpu_only: bool = Field(default=False, description="Render Hot replicas without GPUs (CPU-only clusters).")
    resync_seconds: float = Field(default=300, gt=0, description="Plan at least this often without events.")
    unready_after_failing_seconds: float = Field(
        default=300, gt=0, description="Readiness fails once every planner pass has failed for this long.",
    )
    log_format: LogFormat = Field(default=LogFormat.JSON, description="Log lines as JSON objects, or plain text.")
    log_level: str = Field(default="INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$", description="Log level.")
    runtime_image: str = Field(
        default="", description="Image of the meta-device evaluator Jobs; empty: `rayService.image`.",
    )
    extra_env: list[dict[str, Any]] = Field(
        default_factory=list, description="Extra environment variables of the operator container (NDIF_* settings).",
    )


class Ports(_Values):
    metrics: int = Field(default=9090, ge=1, le=65535, description="Prometheus metrics port (/metrics).")
    health: int = Field(default=8080, ge=1, le=65535, description="Probe port (/healthz, /readyz).")


class ServiceAccount(_Values):
    create: bool = Field(default=True, description="Create the operator's ServiceAccount.")
    name: str = Field(default="", description="ServiceAccount name; empty: the release's full name.")
    annotations: dict[str, str] = Field(default_factory=dict, description="ServiceAccount annotations.")


class Rbac(_Values):
    create: bool = Field(default=True, description="Create the (Cluster)Role and binding from the generated RBAC.")


class ObjectStore(_Values):
    bucket: str = Field(default="", description="S3 bucket for large results; empty: results stay in gateway memory.")
    endpoint: str = Field(default="", description="S3 endpoint URL (MinIO, Ceph, ...); empty: AWS.")
    credentials_secret: str = Field(
        default="",
        description="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and optionally AWS_SESSION_TOKEN, "
        "AWS_REGION) with which the gateway uploads results: mounted as files on the Ray head only, where the "
        "operator pins the gateway (never on the workers, never as environment variables). Model replicas read "
        "S3 model sources with `rayService.weightsCredentialsSecret`; empty: the head pod's own identity.",
    )


class Influx(_Values):
    url: str = Field(default="", description="InfluxDB v2 URL the gateway writes request and model-load points "
                     "to; empty: no points.")
    org: str = Field(default="", description="InfluxDB organisation.")
    bucket: str = Field(default="ndif", description="InfluxDB bucket.")
    token_secret: str = Field(
        default="", description="Secret holding the InfluxDB token (a write-only token for `bucket`): mounted as a "
        "file on the Ray head only, for the gateway; model replicas never hold it.",
    )
    token_key: str = Field(default="token", min_length=1, description="The token's key in `tokenSecret`.")


class ApiKeys(_Values):
    secret: str = Field(
        default="",
        description="Secret whose data values are sha256 hex digests of accepted API keys (one per key); "
        "empty: no authentication. Mounted as a volume, so rotation needs no restart.",
    )


class Limits(_Values):
    max_request_bytes: int | None = Field(default=None, ge=1, description="Request bodies above this are refused.")
    inline_result_max_bytes: int | None = Field(
        default=None, ge=1, description="Results above this go to the object store instead of the response.",
    )


class Ingress(_Values):
    enabled: bool = Field(default=False, description="Expose the gateway through an Ingress.")
    class_name: str = Field(default="", description="ingressClassName.")
    host: str = Field(default="", description="Host name of the rule; empty: any host.")
    tls_secret: str = Field(default="", description="TLS Secret for `host`; empty: no TLS section.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Ingress annotations.")


class GatewayService(_Values):
    type: ServiceType = Field(default=ServiceType.CLUSTER_IP, description="Service type of the gateway.")
    port: int = Field(default=8000, ge=1, le=65535, description="Service port of the gateway.")


class Gateway(_Values):
    object_store: ObjectStore = Field(default_factory=ObjectStore, description="Where large results go.")
    api_keys: ApiKeys = Field(default_factory=ApiKeys, description="Who may send requests.")
    limits: Limits = Field(default_factory=Limits, description="Request limits; empty: the gateway's defaults.")
    min_client_version: str = Field(default="", description="Oldest nnsight client accepted; empty: the default.")
    direct_port: int = Field(
        default=GATEWAY_DIRECT_PORT, ge=0, le=65535,
        description="Port of the gateway replica's own HTTP/websocket listener on the Ray head: users' door, with no "
        "Serve proxy hop, kept across gateway replica replacements. Exposed as port `gateway` of KubeRay's head "
        "Service `<rayService>-head-svc`, which follows the active Ray cluster; the Ingress points there. 0: no "
        "direct listener, users go through Serve's proxy (`service`).",
    )
    service: GatewayService = Field(
        default_factory=GatewayService,
        description="KubeRay's serve Service `<rayService>-serve-svc`: Serve's proxy on every Ray pod (KubeRay's "
        "health checks, the operator's reads of the gateway, and users when `directPort` is 0).",
    )
    ingress: Ingress = Field(
        default_factory=Ingress,
        description="Optional Ingress to the gateway: to `directPort` on the head Service, else to `service`.",
    )
    influx: Influx = Field(default_factory=Influx, description="Optional InfluxDB points, written by the gateway.")


class HeadGroup(_Values):
    resources: Resources = Field(
        default_factory=lambda: Resources(requests={"cpu": "2", "memory": "8Gi"}, limits={"memory": "8Gi"}),
        description="Resources of the Ray head container (runs the gateway, pinned there, and no model replica).",
    )
    node_selector: NodeSelector = Field(default_factory=dict, description="nodeSelector of the head pod.")
    tolerations: Tolerations = Field(default_factory=list, description="Tolerations of the head pod.")


class WorkerGroup(_Values):
    name: str = Field(min_length=1, max_length=40, pattern="^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                      description="Worker group name.")
    replicas: int = Field(default=1, ge=0, description="Pods of this group (the autoscaler's starting point).")
    min_replicas: int = Field(default=0, ge=0, description="Fewest pods (autoscaler).")
    max_replicas: int = Field(default=1, ge=0, description="Most pods (autoscaler; the planner may plan up to it).")
    gpus: int = Field(default=1, ge=0, description="nvidia.com/gpu per pod.")
    gpu_memory: str = Field(
        default="", description="Memory of one GPU (e.g. 80Gi), written as the ndif.dev/gpu-memory annotation; "
        "empty: read from the nvidia.com/gpu.memory label (GPU Feature Discovery).",
    )
    resources: Resources = Field(
        default_factory=lambda: Resources(requests={"cpu": "8", "memory": "64Gi"}, limits={"memory": "64Gi"}),
        description="CPU and memory of each worker (nvidia.com/gpu is added from `gpus`).",
    )
    node_selector: NodeSelector = Field(default_factory=dict, description="nodeSelector of the group's pods.")
    tolerations: Tolerations = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        description="Tolerations of the group's pods.",
    )


class NetworkPolicyObjectStore(_Values):
    cidrs: list[str] = Field(
        default_factory=list,
        description="CIDRs of the object store (S3, MinIO) the workers read model weights from; empty: no rule.",
    )
    ports: list[int] = Field(default_factory=lambda: [443], description="Its TCP ports.")


def _kube_dns() -> Peers:
    return [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
             "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]


def _kuberay_operator() -> Peers:
    return [{"namespaceSelector": {},
             "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]


class HeadDestination(_Values):
    to: Peers = Field(default_factory=list, description="Peers (NetworkPolicyPeer: ipBlock, or namespace and pod "
                      "selectors for an in-cluster service); empty: no rule.")
    ports: list[int] = Field(default_factory=lambda: [443], description="Its TCP ports.")


class InfluxDestination(HeadDestination):
    ports: list[int] = Field(default_factory=lambda: [8086], description="Its TCP ports.")


class ApiServerDestination(HeadDestination):
    ports: list[int] = Field(default_factory=lambda: [443, 6443], description="Its TCP ports.")


class HeadNetworkPolicy(_Values):
    gateway_ports: list[int] = Field(
        default_factory=lambda: [8000], min_length=1,
        description="Container ports of the head on which the gateway is reached: by users (through the Service, "
        "an Ingress controller or a load balancer) and by the operator, which long-polls the gateway's /demand. "
        "Serve's HTTP port; the gateway's own listener (`gateway.directPort`) is always added.",
    )
    gateway_from: Peers = Field(
        default_factory=list,
        description="Peers (NetworkPolicyPeer) allowed to reach `gatewayPorts`, e.g. the Ingress controller's "
        "pods; the operator's pod is always added. Empty: any source (a LoadBalancer Service's clients).",
    )
    dashboard_from: Peers = Field(
        default_factory=_kuberay_operator,
        description="Peers allowed to reach the Ray dashboard (8265): KubeRay's operator pushes serveConfigV2 and "
        "reads Serve's status there. The dashboard also accepts Ray jobs (code run on the head, next to the "
        "gateway's credentials): list only the KubeRay operator. `kubectl port-forward` is not affected.",
    )
    results_store: HeadDestination = Field(
        default_factory=HeadDestination,
        description="Where the gateway uploads results (`gateway.objectStore`): required when a bucket is set, "
        "unless `publicHttps`.",
    )
    influx: InfluxDestination = Field(
        default_factory=InfluxDestination,
        description="The InfluxDB the gateway writes points to (`gateway.influx.url`): required when a URL is set.",
    )
    api_server: ApiServerDestination = Field(
        default_factory=ApiServerDestination,
        description="The Kubernetes API server's addresses (`kubectl get endpoints kubernetes`): needed only by "
        "KubeRay's autoscaler sidecar on the head, so required when `rayService.autoscaler` is on.",
    )
    public_https: bool = Field(
        default=False,
        description="Also allow HTTPS (443) to public addresses (not private, link-local or metadata ranges): "
        "for a results bucket on AWS S3, which has no fixed addresses.",
    )
    extra_ingress: Rules = Field(
        default_factory=list, description="More ingress rules (NetworkPolicyIngressRule) for the head, e.g. the Ray "
        "client port (10001) from an admin namespace.",
    )
    extra_egress: Rules = Field(
        default_factory=list, description="More egress rules (NetworkPolicyEgressRule) for the head, e.g. the cloud "
        "metadata endpoint when the gateway uploads with the head pod's own identity.",
    )


class NetworkPolicy(_Values):
    enabled: bool = Field(
        default=True,
        description="Two NetworkPolicies on the chart's Ray pods (by label; needs a CNI that enforces "
        "NetworkPolicy). Workers, where model replicas run user code: egress only to the Ray pods, DNS and the "
        "object store; ingress only from the Ray pods, plus Serve (8000) and metrics (8080). The head, where "
        "the gateway runs with its credentials: see `head`.",
    )
    object_store: NetworkPolicyObjectStore = Field(
        default_factory=NetworkPolicyObjectStore, description="Where the workers may read model weights.",
    )
    dns: Peers = Field(
        default_factory=_kube_dns, description="Peers (NetworkPolicyPeer) answering DNS on port 53.",
    )
    public_https: bool = Field(
        default=True,
        description="Also allow HTTPS (443) to public addresses (not private, link-local or metadata ranges): "
        "models with a huggingFace source download from the Hub. Turn off when every model comes from S3 or "
        "a local path, so that replicas reach only Ray, DNS and the object store.",
    )
    extra_egress: Rules = Field(
        default_factory=list,
        description="More egress rules (NetworkPolicyEgressRule) for the workers: e.g. a Hugging Face Hub mirror. "
        "The gateway's destinations (results bucket, InfluxDB) are the head's (`head`).",
    )
    head: HeadNetworkPolicy = Field(
        default_factory=HeadNetworkPolicy,
        description="The head pod's policy: ingress from the Ray pods, to `gatewayPorts` (users, the operator), "
        "to the dashboard from `dashboardFrom` and to metrics (8080); egress only to the Ray pods, DNS, the "
        "results store, InfluxDB and (autoscaler) the API server.",
    )


class RayService(_Values):
    create: bool = Field(
        default=False,
        description="Create the RayService (KubeRay) the operator plans on, named `operator.rayService`, in the "
        "release namespace.",
    )
    ray_version: str = Field(default="2.60.0", description="rayVersion: must match Ray in the runtime image.")
    image: Image = Field(default_factory=lambda: Image(repository="ghcr.io/ndif-team/ndif-runtime"),
                         description="The runtime image (head and workers).")
    autoscaler: bool = Field(default=False, description="enableInTreeAutoscaling: Serve demand scales worker pods.")
    head: HeadGroup = Field(default_factory=HeadGroup, description="The Ray head (gateway, no GPU).")
    weights_credentials_secret: str = Field(
        default="",
        description="Secret with read-only object-store keys (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
        "optionally AWS_SESSION_TOKEN, AWS_REGION; HF_TOKEN for gated Hub models) for models with an s3 "
        "source: mounted as files on the worker pods only. A replica keeps them only while it loads its "
        "model. Grant read on the model prefixes and nothing else: a replica runs users' code. Empty: the "
        "worker pods' own identity.",
    )
    worker_groups: list[WorkerGroup] = Field(
        default_factory=lambda: [WorkerGroup(name="gpu")], min_length=1, description="GPU worker groups.",
    )
    network_policy: NetworkPolicy = Field(
        default_factory=NetworkPolicy, description="What the Ray pods (workers: model replicas; head: the gateway) "
        "may reach and be reached from.",
    )


class ServiceMonitor(_Values):
    enabled: bool = Field(default=True, description="ServiceMonitor for the operator's /metrics.")
    interval: str = Field(default="30s", description="Scrape interval.")


class PodMonitor(_Values):
    enabled: bool = Field(default=True, description="PodMonitor for Ray's metrics (head and workers, port 8080).")
    interval: str = Field(default="30s", description="Scrape interval.")


class PrometheusRule(_Values):
    enabled: bool = Field(default=True, description="PrometheusRule with the NDIF alerts (runbooks: docs/alerts.md).")


class Dashboards(_Values):
    enabled: bool = Field(default=True, description="Grafana dashboards as ConfigMaps (grafana_dashboard: \"1\").")
    namespace: str = Field(default="", description="Namespace of the ConfigMaps; empty: the release namespace.")


class Monitoring(_Values):
    enabled: bool = Field(
        default=True, description="Master switch; needs the Prometheus Operator CRDs (kube-prometheus-stack).",
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Extra labels on monitors and rules (e.g. release: kube-prometheus-stack).",
    )
    service_monitor: ServiceMonitor = Field(default_factory=ServiceMonitor, description="Operator scraping.")
    pod_monitor: PodMonitor = Field(default_factory=PodMonitor, description="Ray scraping.")
    prometheus_rule: PrometheusRule = Field(default_factory=PrometheusRule, description="Alerts.")
    dashboards: Dashboards = Field(default_factory=Dashboards, description="Grafana dashboards.")


class ChartValues(_Values):
    image: Image = Field(default_factory=lambda: Image(repository="ghcr.io/ndif-team/ndif-operator"),
                         description="The operator image.")
    image_pull_secrets: list[dict[str, str]] = Field(default_factory=list, description="imagePullSecrets.")
    name_override: str = Field(default="", description="Replaces the chart name in object names.")
    fullname_override: str = Field(default="", description="Replaces the release-chart full name.")
    watch: Watch = Field(default_factory=Watch, description="What the operator watches.")
    operator: OperatorConfig = Field(default_factory=OperatorConfig, description="Operator settings (NDIF_*).")
    ports: Ports = Field(default_factory=Ports, description="Operator ports.")
    resources: Resources = Field(
        default_factory=lambda: Resources(requests={"cpu": "100m", "memory": "256Mi"}, limits={"memory": "1Gi"}),
        description="Operator container resources.",
    )
    node_selector: NodeSelector = Field(default_factory=dict, description="Operator pod nodeSelector.")
    tolerations: Tolerations = Field(default_factory=list, description="Operator pod tolerations.")
    affinity: dict[str, Any] = Field(default_factory=dict, description="Operator pod affinity.")
    pod_annotations: dict[str, str] = Field(default_factory=dict, description="Operator pod annotations.")
    service_account: ServiceAccount = Field(default_factory=ServiceAccount, description="Operator identity.")
    rbac: Rbac = Field(default_factory=Rbac, description="RBAC objects.")
    gateway: Gateway = Field(default_factory=Gateway, description="Gateway settings the operator renders.")
    ray_service: RayService = Field(default_factory=RayService, description="Optional RayService.")
    monitoring: Monitoring = Field(default_factory=Monitoring, description="Prometheus and Grafana objects.")

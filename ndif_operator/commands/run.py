"""Run the operator: watch ModelDeployments and RayServices, plan, and patch each RayService's
serveConfigV2 (and nothing else of it); write each ModelDeployment's status.

Settings come from the environment (NDIF_ prefix); flags override them:

  NDIF_NAMESPACES           comma-separated namespaces to watch (default: all)
  NDIF_RAY_SERVICE          RayService used when spec.rayService is unset (default: ndif)
  NDIF_DEBOUNCE_SECONDS     quiet time that turns a burst of changes into one pass (0.5)
  NDIF_RESYNC_SECONDS       plan at least this often without events (300)
  NDIF_FINALIZER            finalizer holding deleted models until their app is gone (ndif.dev/finalizer)
  NDIF_METRICS_PORT         Prometheus metrics port, 0 disables (9090)
  NDIF_KUBE_API_URL         API server URL (tests, development), with NDIF_KUBE_TOKEN_FILE, NDIF_KUBE_CA_FILE,
                            NDIF_KUBE_INSECURE_SKIP_TLS_VERIFY; default: $KUBECONFIG, then the pod's service
                            account, then ~/.kube/config (NDIF_KUBE_CONTEXT picks a context)
  NDIF_CPU_ONLY             render HOT replicas with num_gpus 0 (CPU-only clusters)
  NDIF_REPLICA_NUM_CPUS / NDIF_GATEWAY_NUM_CPUS   num_cpus of model / gateway replicas
  NDIF_BACKOFF_INITIAL_SECONDS / NDIF_BACKOFF_MAX_SECONDS   retry delays after API errors
  NDIF_OPERATOR_NAMESPACE   namespace of the evaluator cache ConfigMap and meta-device Jobs (ndif-system)
  NDIF_CACHE_CONFIG_MAP     evaluator cache ConfigMap (ndif-evaluator-cache)
  NDIF_RUNTIME_IMAGE        image of the meta-device evaluator Jobs (checkpoints without safetensors)
  NDIF_GATEWAY_URL          gateway base URL ({name}, {namespace} of the RayService) for activateOnRequest
  NDIF_ACTIVATION_TTL_SECONDS   how long a requested Warm model stays Hot (900)
  NDIF_ESTIMATE_RETRY_INITIAL_SECONDS / NDIF_ESTIMATE_RETRY_MAX_SECONDS   retries of failed estimates (10 / 600)

Needs the RBAC generated from the code (charts/ndif-operator/files/rbac.yaml, `ndif-operator generate`).
A login failure (no credentials, 401, 403, no CRD, untrusted certificate) exits with status 1 and one
line that says what to fix.
"""

from __future__ import annotations

import argparse
import logging
import sys

HELP = "run the operator (Kopf): ModelDeployments -> RayService serveConfigV2 + status"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespaces", help="override NDIF_NAMESPACES (comma-separated)")
    parser.add_argument("--ray-service", help="override NDIF_RAY_SERVICE")
    parser.add_argument("--metrics-port", type=int, help="override NDIF_METRICS_PORT (0 disables)")
    parser.add_argument("--liveness", metavar="URL", help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def run(args: argparse.Namespace) -> int:
    from ndif_operator.operator.handlers import run_operator
    from ndif_operator.operator.login import LoginError
    from ndif_operator.operator.settings import OperatorSettings

    overrides = {key: value for key, value in {
        "namespaces": args.namespaces, "ray_service": args.ray_service, "metrics_port": args.metrics_port,
    }.items() if value is not None}
    settings = OperatorSettings(**overrides)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_operator(settings, liveness_endpoint=args.liveness)
    except LoginError as exc:
        print(f"ndif-operator: error: {exc}", file=sys.stderr)
        return 1
    return 0

"""Run the operator: watch ModelDeployments and RayServices, plan, and patch each RayService's
serveConfigV2 (and nothing else of it); write each ModelDeployment's status.

Settings come from the environment (NDIF_ prefix; the list below is generated from
OperatorSettings, as is docs/settings.md); the flags override the ones they name.

Needs the RBAC generated from the code (charts/ndif-operator/files/rbac.yaml, `ndif-operator generate`).
A login failure (no credentials, 401, 403, no CRD, untrusted certificate) exits with status 1 and one
line that says what to fix.
"""

from __future__ import annotations

import argparse
import sys

HELP = "run the operator (Kopf): ModelDeployments -> RayService serveConfigV2 + status"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ndif_operator.commands.settings_doc import settings_help

    parser.epilog = settings_help()
    parser.add_argument("--namespaces", help="override NDIF_NAMESPACES (comma-separated)")
    parser.add_argument("--ray-service", help="override NDIF_RAY_SERVICE")
    parser.add_argument("--metrics-port", type=int, help="override NDIF_METRICS_PORT (0 disables)")
    parser.add_argument("--liveness", metavar="URL", help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ndif_operator import logs
    from ndif_operator.operator.handlers import run_operator
    from ndif_operator.operator.login import LoginError
    from ndif_operator.operator.settings import OperatorSettings

    overrides = {key: value for key, value in {
        "namespaces": args.namespaces, "ray_service": args.ray_service, "metrics_port": args.metrics_port,
    }.items() if value is not None}
    try:
        settings = OperatorSettings(**overrides)
    except ValidationError as exc:
        for error in exc.errors():
            field = "_".join(str(p) for p in error["loc"]).upper()
            print(f"ndif-operator: error: NDIF_{field}: {error['msg']}", file=sys.stderr)
        return 2
    logs.setup(settings.log_format.value, "DEBUG" if args.verbose else settings.log_level)
    try:
        run_operator(settings, liveness_endpoint=args.liveness)
    except LoginError as exc:
        print(f"ndif-operator: error: {exc}", file=sys.stderr)
        return 1
    return 0

"""Write every generated file from its source of truth: the CRD from the pydantic API models, the
chart's values.yaml and values.schema.json from the typed chart values, the chart's RBAC
(files/rbac.yaml) from the operator's declared API calls, the chart's dashboards, docs/settings.md
from OperatorSettings."""

from __future__ import annotations

import argparse
import sys

from ndif_operator.api import crd
from ndif_operator.chart import generate as chart
from ndif_operator.commands import settings_doc
from ndif_operator.operator import rbac

HELP = "write generated files (crds/, chart values, RBAC and dashboards, docs/settings.md); --check fails on drift"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed file is stale")


def run(args: argparse.Namespace) -> int:
    rc = crd.main(["--check"] if args.check else [])
    stale = chart.write(check=args.check)
    if settings_doc.write(check=args.check):
        stale.append(settings_doc.DOC_PATH)
    for path in stale:
        print(f"{'stale' if args.check else 'wrote'} {path}", file=sys.stderr)
    rbac_rc = rbac.main(check=args.check)
    return rc or rbac_rc or (1 if args.check and stale else 0)

"""Write every generated file from its source of truth (the CRD from the pydantic models)."""

from __future__ import annotations

import argparse

from ndif_operator.api import crd

HELP = "write generated files (crds/); --check fails on drift"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed file is stale")


def run(args: argparse.Namespace) -> int:
    return crd.main(["--check"] if args.check else [])

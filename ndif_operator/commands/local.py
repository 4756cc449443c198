"""Run the models of some ModelDeployment manifests on this machine, without Kubernetes.

Starts a local Ray head (loopback only, auth off), sizes, plans and renders the manifests exactly as
the operator does (this machine's GPUs, or its RAM when it has none), applies the Serve config
through Serve's REST API and serves the nnsight gateway on localhost:

    ndif-operator local .demo/tiny-llama.yaml        # written by `make demo`
    NDIF_HOST=http://127.0.0.1:8001 python my_experiment.py      # model.trace(..., remote=True)

Ctrl-C (or SIGTERM) stops everything it started.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

from ndif_operator.api.v1alpha1 import GIB

HELP = "serve manifests on this machine: local Ray + the nnsight gateway on localhost"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifests", nargs="+", type=Path, help="ModelDeployment YAML files or directories")
    parser.add_argument(
        "--port-offset", type=int, default=0,
        help="shift every port (Ray 6390, dashboard 8265, Serve 8000, gateway 8001, ...) by 0..1700",
    )  # fmt: skip
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    parser.add_argument(
        "--reserved-memory-gib", type=float, default=3.0,
        help="host RAM kept for Ray itself and the gateway, not offered to models (default 3)",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for RUNNING")
    parser.add_argument(
        "--api-key", action="append", default=[],
        help="require this key (NDIF_API_KEY on clients); repeatable; default: no auth",
    )  # fmt: skip
    parser.add_argument("--object-store-bucket", default=None, help="S3 bucket for large results")
    parser.add_argument("--object-store-endpoint", default=None, help="S3-compatible endpoint URL")
    parser.add_argument("--ready-file", type=Path, default=None, help="write connection info here once serving")
    parser.add_argument(
        "--exit-when-ready", action="store_true",
        help="tear down as soon as everything is RUNNING (a smoke check)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from ndif_operator.commands.preflight import missing_model_dirs
    from ndif_operator.local.embedded import LocalMode, LocalSettings, Stopped, stop_on_signals, write_ready_file
    from ndif_operator.local.manifests import ManifestError, load_manifests
    from ndif_operator.local.ray_head import RayHeadError, RayPorts
    from ndif_operator.local.serve_rest import ServeRestError

    def log(message: str) -> None:
        print(message, flush=True)

    try:
        ports = RayPorts.offset(args.port_offset)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    settings = LocalSettings(
        manifests=tuple(args.manifests),
        ports=ports,
        reserved_memory_bytes=int(args.reserved_memory_gib * GIB),
        deploy_timeout_s=args.timeout,
        api_key_hashes=tuple(hashlib.sha256(k.encode()).hexdigest() for k in args.api_key),
        object_store_bucket=args.object_store_bucket,
        object_store_endpoint_url=args.object_store_endpoint,
        gateway_api_key=args.api_key[0] if args.api_key else None,
        **({"num_cpus": args.num_cpus} if args.num_cpus else {}),
    )
    try:
        missing = missing_model_dirs(load_manifests(args.manifests, on_skip=lambda _: None))
    except (OSError, ManifestError) as exc:
        print(f"ndif-operator local: error: {exc}", file=sys.stderr)
        return 2
    for problem in missing:
        print(f"ndif-operator local: {'error' if args.exit_when_ready else 'warning'}: {problem}", file=sys.stderr)
    if missing and args.exit_when_ready:
        return 1  # the smoke check would only find it Cold minutes later
    mode = LocalMode(settings, log=log)
    with stop_on_signals():
        try:
            mode.up()
            log("\n" + mode.table() + "\n")
            log(f"serving: NDIF_HOST={mode.ndif_host}   (Serve dashboard API {settings.ports.dashboard})")
            if args.ready_file is not None:
                write_ready_file(args.ready_file, mode.ready_info())
            if args.exit_when_ready:
                return 0
            log("press Ctrl-C to stop")
            polls = 0
            watcher = mode.demand_watcher()  # activateOnRequest: the gateway pushes demand at once
            while mode.head is not None and mode.head.running:
                pushed = None
                if watcher is not None:
                    pushed = watcher.wait(1.0)
                else:
                    time.sleep(1.0)
                polls += 1
                if pushed is not None or polls % 5 == 0:  # pushed demand now; window ends every 5 s
                    try:
                        mode.poll_activation(demands=pushed)
                    except ServeRestError as exc:
                        log(f"activation on request: could not apply the new config: {exc}")
            log("the Ray head exited on its own; stopping")
            return 1
        except Stopped as stop:
            log(f"\n{stop}: stopping")
            return 0
        except (ManifestError, RayHeadError, ServeRestError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 1
        finally:
            mode.down()
            if args.ready_file is not None:
                args.ready_file.unlink(missing_ok=True)

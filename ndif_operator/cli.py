"""`ndif-operator`: one command, several subcommands, each in its own module.

Subcommand modules live in `ndif_operator.commands` and expose `HELP: str`,
`add_arguments(parser)` and `run(args) -> int`. They are imported only when chosen, so
`ndif-operator plan` never pays for kopf and `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Sequence
from importlib import metadata
from types import ModuleType

# Each is a module under ndif_operator.commands.
SUBCOMMANDS: tuple[str, ...] = (
    "generate",  # write the generated files (CRD)
    "plan",  # dry-run placement preview
    "run",  # the Kopf operator
    "local",  # embedded mode: local Ray + gateway on localhost
)

_DESCRIPTION = """\
ndif-operator hosts NNsight models on a shared GPU cluster: it reads ModelDeployments, sizes each
model, plans placement (Hot on GPU, Warm in CPU RAM, Cold on disk) and writes the serve config of
a KubeRay RayService. Run `ndif-operator <command> --help` for a command's options.
"""


def _load(name: str) -> ModuleType:
    return importlib.import_module(f"ndif_operator.commands.{name}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ndif-operator", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name in SUBCOMMANDS:
        if only is not None and name != only:
            # Cheap placeholder so `--help` lists every command without importing all of them.
            sub.add_parser(name, help=f"see `ndif-operator {name} --help`")
            continue
        module = _load(name)
        child = sub.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(child)
        child.set_defaults(_module=module)
    return parser


def _version() -> str:
    try:
        return metadata.version("ndif-operator")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in args_list if a in SUBCOMMANDS), None)
    parser = build_parser(only=chosen)
    parser.add_argument("--version", action="version", version=f"ndif-operator {_version()}")
    args = parser.parse_args(args_list)
    module: ModuleType = args._module
    try:
        result: int = module.run(args)
    except BrokenPipeError:
        # `plan -o json | head`: the reader left. Silence the final flush too, and end as SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    raise SystemExit(main())

"""Checks `plan` and `local` make before doing anything: a model directory that does not exist
on this machine is an error to report (and exit non-zero), not a model silently planned Cold."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ndif_operator.api import ModelDeployment


def missing_model_dirs(deployments: Iterable[ModelDeployment]) -> list[str]:
    """One message per ModelDeployment whose `source.localPath` does not exist here."""
    problems = []
    for md in deployments:
        local = md.spec.model.source.local_path
        if local is not None and not Path(local.path).exists():
            where = f"{md.metadata.get('namespace', 'default')}/{md.metadata.get('name', '?')}"
            problems.append(f"{where}: model directory {local.path} does not exist")
    return problems

"""Read ModelDeployment manifests from YAML files, validated as the API server would."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from ndif_operator.api import KIND, ModelDeployment

DEFAULT_NAMESPACE = "default"


class ManifestError(ValueError):
    """A file that is not a valid ModelDeployment manifest (the message names file and field)."""


def parse_manifests(
    text: str, origin: str, *, on_other_kind: Callable[[str], None] | None = None
) -> list[ModelDeployment]:
    """Every ModelDeployment in a (multi-document) YAML text.

    Other kinds are refused, unless `on_other_kind` is given: then it is told, and they are skipped
    (a directory may hold other files, as `kubectl apply -f dir` allows).
    """
    from ndif_operator.api.validation import ValidationFailed, check_object  # cel-python: load lazily

    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ManifestError(f"{origin}: not valid YAML: {exc}") from exc
    result: list[ModelDeployment] = []
    for index, doc in enumerate(documents):
        where = f"{origin} (document {index + 1})"
        if not isinstance(doc, dict) or doc.get("kind") != KIND:
            kind = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
            if on_other_kind is not None:
                on_other_kind(f"{where}: skipped (kind {kind!r}, not {KIND})")
                continue
            raise ManifestError(f"{where}: expected kind {KIND}, got {kind!r}")
        metadata: dict[str, Any] = dict(doc.get("metadata") or {})
        if not metadata.get("name"):
            raise ManifestError(f"{where}: metadata.name is required")
        metadata.setdefault("namespace", DEFAULT_NAMESPACE)
        obj = {**doc, "metadata": metadata}
        try:
            result.append(ModelDeployment.model_validate(check_object(obj)))
        except ValidationFailed as exc:
            raise ManifestError(f"{where}: {exc}") from exc
    return result


def load_manifests(
    paths: Iterable[Path], *, on_skip: Callable[[str], None] | None = None
) -> list[ModelDeployment]:
    """Load files, and the `*.yaml`/`*.yml` files of directories; names must be unique per namespace.

    A file named explicitly must hold only ModelDeployments; in a directory, other kinds are
    skipped and reported to `on_skip` (default: ignored).
    """
    deployments: list[ModelDeployment] = []
    for path in paths:
        in_dir = path.is_dir()
        files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")]) if in_dir else [path]
        for file in files:
            try:
                text = file.read_text()
            except OSError as exc:
                raise ManifestError(f"{file}: cannot read: {exc.strerror}") from exc
            skip = (on_skip or (lambda _: None)) if in_dir else None
            deployments.extend(parse_manifests(text, str(file), on_other_kind=skip))
    if not deployments:
        raise ManifestError("no ModelDeployment found in the given files")
    seen: set[str] = set()
    for md in deployments:
        key = deployment_key(md)
        if key in seen:
            raise ManifestError(f"ModelDeployment {key} is defined twice")
        seen.add(key)
    return deployments


def deployment_key(md: ModelDeployment) -> str:
    """`namespace/name`, the key the planner and the Serve args use."""
    return f"{md.metadata.get('namespace', DEFAULT_NAMESPACE)}/{md.metadata['name']}"

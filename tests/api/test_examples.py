"""Every example is accepted as the API server would accept it; bad manifests are rejected clearly."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from ndif_operator.api import ModelDeployment
from ndif_operator.api.validation import ValidationFailed, apply_defaults, check_object, validate_object

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("[0-9][0-9]-*.yaml"))


def _load(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return document


def test_there_is_one_example_per_use_case() -> None:
    assert [p.name for p in EXAMPLE_FILES] == [
        "01-small-model-hot.yaml",
        "02-llama-70b-tensor-parallel.yaml",
        "03-warm-only.yaml",
        "04-dedicated.yaml",
        "05-s3-source.yaml",
    ]


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_is_valid(path: Path) -> None:
    obj = yaml.safe_load(path.read_text())
    assert validate_object(obj) == []


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_pydantic_and_crd_defaults_agree(path: Path) -> None:
    # The API server fills CRD defaults; pydantic fills model defaults. They must be the same.
    obj = yaml.safe_load(path.read_text())
    from_crd = apply_defaults(obj)["spec"]
    from_model = ModelDeployment.model_validate(obj).spec.model_dump(mode="json", exclude_none=True)
    assert from_model == from_crd


def _mutate(base: str, change: Any) -> dict[str, Any]:
    obj = copy.deepcopy(_load(base))
    change(obj["spec"])
    return obj


INVALID: list[tuple[str, dict[str, Any], str, str]] = [
    # (case, manifest, field named in the message, rule or reason named in the message)
    ("tensor parallel size 3", _mutate("01-small-model-hot.yaml", lambda s: s.update(tensorParallelSize=3)),
     "spec.tensorParallelSize", "must be 1, 2, 4, 8 or 'auto'"),
    ("tensor parallel size 'max'", _mutate("01-small-model-hot.yaml", lambda s: s.update(tensorParallelSize="max")),
     "spec.tensorParallelSize", "must be 1, 2, 4, 8 or 'auto'"),
    ("two sources", _mutate("05-s3-source.yaml", lambda s: s["model"]["source"].update(localPath={"path": "/m"})),
     "spec.model.source", "exactly one of huggingFace, localPath, s3"),
    ("no source kind", _mutate("05-s3-source.yaml", lambda s: s["model"].update(source={})),
     "spec.model.source", "exactly one of huggingFace, localPath, s3"),
    ("dedicated but warm", _mutate("04-dedicated.yaml", lambda s: s.update(level="Warm")),
     "spec.dedicated", "a dedicated model must have level Hot"),
    ("unknown level", _mutate("01-small-model-hot.yaml", lambda s: s.update(level="Lukewarm")),
     "spec.level", "is not one of ['Hot', 'Warm', 'Cold']"),
    ("negative replicas", _mutate("01-small-model-hot.yaml", lambda s: s.update(replicas=-1)),
     "spec.replicas", "minimum"),
    ("replicas as text", _mutate("01-small-model-hot.yaml", lambda s: s.update(replicas="two")),
     "spec.replicas", "is not of type 'integer'"),
    ("unknown field", _mutate("01-small-model-hot.yaml", lambda s: s.update(gpus=2)),
     "spec.gpus", "unknown field"),
    ("missing repoId", _mutate("01-small-model-hot.yaml", lambda s: s["model"].pop("repoId")),
     "spec.model.repoId", "Required value"),
    ("repoId with spaces", _mutate("01-small-model-hot.yaml", lambda s: s["model"].update(repoId="my model")),
     "spec.model.repoId", "does not match"),
    ("autoscaling min above max",
     _mutate("04-dedicated.yaml", lambda s: s["autoscaling"].update(minReplicas=5, maxReplicas=2)),
     "spec.autoscaling", "minReplicas must not exceed autoscaling.maxReplicas"),
    ("replicas outside autoscaling bounds", _mutate("04-dedicated.yaml", lambda s: s.update(replicas=9)),
     "spec.replicas", "replicas must lie within autoscaling.minReplicas..maxReplicas"),
    ("relative local path",
     _mutate("01-small-model-hot.yaml", lambda s: s["model"].update(source={"localPath": {"path": "models/x"}})),
     "spec.model.source.localPath.path", "does not match '^/'"),
    ("unsupported dtype", _mutate("01-small-model-hot.yaml", lambda s: s["model"].update(dtype="int4")),
     "spec.model.dtype", "is not one of"),
    ("priority out of range", _mutate("01-small-model-hot.yaml", lambda s: s.update(priority=5000)),
     "spec.priority", "maximum"),
    ("s3 without bucket",
     _mutate("05-s3-source.yaml", lambda s: s["model"]["source"]["s3"].pop("bucket")),
     "spec.model.source.s3.bucket", "Required value"),
    ("request timeout zero",
     _mutate("01-small-model-hot.yaml", lambda s: s.update(limits={"requestTimeoutSeconds": 0})),
     "spec.limits.requestTimeoutSeconds", "minimum"),
    ("missing spec", {"apiVersion": "ndif.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "x"}},
     "spec", "Required value"),
]


@pytest.mark.parametrize(("case", "manifest", "field", "rule"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_manifest_is_rejected_naming_field_and_rule(
    case: str, manifest: dict[str, Any], field: str, rule: str
) -> None:
    with pytest.raises(ValidationFailed) as info:
        check_object(manifest)
    message = str(info.value)
    assert f"{field}:" in message, message
    assert rule in message, message


def test_repo_id_is_immutable_on_update() -> None:
    old = _load("02-llama-70b-tensor-parallel.yaml")
    new = copy.deepcopy(old)
    new["spec"]["model"]["repoId"] = "meta-llama/Llama-3.1-8B"
    errors = [str(e) for e in validate_object(new, old)]
    assert errors == ["spec.model.repoId: Invalid value: repoId is immutable (rule: self == oldSelf)"]
    # Other fields may change; the transition rule does not fire on create.
    new["spec"]["model"]["repoId"] = old["spec"]["model"]["repoId"]
    new["spec"]["replicas"] = 2
    assert validate_object(new, old) == []


def test_every_error_is_reported_at_once() -> None:
    obj = _mutate("04-dedicated.yaml", lambda s: s.update(level="Warm", tensorParallelSize=3))
    fields = {e.path for e in validate_object(obj)}
    assert fields == {"spec.dedicated", "spec.tensorParallelSize"}

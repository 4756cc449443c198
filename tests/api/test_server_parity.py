"""Offline validation gives the API server's verdict on the parity corpus (tests/api/data), and
`plan -f` and local mode answer bad manifests with an error line, never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ndif_operator.api import ModelDeployment
from ndif_operator.api.validation import apply_defaults, validate_object
from ndif_operator.cli import main
from ndif_operator.local.manifests import ManifestError, parse_manifests

ROOT = Path(__file__).resolve().parents[2]
CORPUS = yaml.safe_load((Path(__file__).parent / "data" / "server_parity.yaml").read_text())["cases"]
INVENTORY = ROOT / "inventories" / "example.yaml"


def _manifest(case: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "ndif.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": case["name"], "namespace": "ml"}, "spec": case["spec"]}


def _at(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        assert isinstance(obj, dict) and part in obj, f"{dotted} not stored"
        obj = obj[part]
    return obj


def test_the_corpus_is_large_and_mixed() -> None:
    verdicts = [case["verdict"] for case in CORPUS]
    assert len(CORPUS) >= 40 and verdicts.count("accepted") >= 15 and verdicts.count("rejected") >= 15
    assert len({case["name"] for case in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c["name"])
def test_offline_validation_gives_the_servers_verdict(case: dict[str, Any]) -> None:
    manifest = _manifest(case)
    errors = validate_object(manifest)
    if case["verdict"] == "accepted":
        assert errors == []
        stored = apply_defaults(manifest)
        for dotted, expected in case["stored"].items():
            actual = _at(stored["spec"], dotted)
            assert actual == expected and type(actual) is type(expected), (dotted, actual)
        ModelDeployment.model_validate(stored)  # what the operator parses from the stored object
    else:
        assert errors, "accepted offline, rejected by the server"
        assert case["field"] in {e.path for e in errors}, [str(e) for e in errors]


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c["name"])
def test_plan_and_local_mode_answer_without_a_traceback(case: dict[str, Any], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(_manifest(case)))
    code = main(["plan", "-f", str(path), "--inventory", str(INVENTORY)])
    out, err = capsys.readouterr()
    err = out + err
    assert "Traceback" not in err
    if case["verdict"] == "accepted":
        assert code == 0, err
        assert len(parse_manifests(path.read_text(), str(path))) == 1
    else:
        assert code != 0 and "error:" in err and case["field"] in err, err
        with pytest.raises(ManifestError, match=case["field"].replace(".", r"\.")):
            parse_manifests(path.read_text(), str(path))

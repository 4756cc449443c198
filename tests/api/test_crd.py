"""The committed CRD is exactly what the pydantic models generate, and it is structural."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from ndif_operator.api import crd, v1alpha1
from ndif_operator.api.structural import SchemaError, to_structural


def test_committed_crd_has_no_drift() -> None:
    assert crd.CRD_PATH.read_text() == crd.render_crd(), "crds/ is stale: run `make generate`"


def test_rendering_is_deterministic() -> None:
    assert crd.render_crd() == crd.render_crd()


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        yield path, node
        for name, sub in node.get("properties", {}).items():
            yield from _walk(sub, f"{path}.{name}")
        if "items" in node:
            yield from _walk(node["items"], f"{path}[]")
        for sub in node.get("anyOf", []):
            yield from _walk(sub, f"{path}|")


def _schema() -> dict[str, Any]:
    document = yaml.safe_load(crd.CRD_PATH.read_text())
    schema: dict[str, Any] = document["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


@pytest.mark.parametrize("forbidden", ["$ref", "$defs", "definitions", "title", "additionalProperties", "const"])
def test_schema_has_no_constructs_the_api_server_rejects(forbidden: str) -> None:
    offenders = [path for path, node in _walk(_schema()) if forbidden in node]
    assert offenders == []


def test_every_node_is_typed_or_int_or_string() -> None:
    # Structural rule: every field has a type, except x-kubernetes-int-or-string fields.
    for path, node in _walk(_schema()):
        if path.endswith("|"):
            continue
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        assert node.get("type") != "null", path


def test_int_or_string_has_the_structural_form() -> None:
    tp = _schema()["properties"]["spec"]["properties"]["tensorParallelSize"]
    assert tp["x-kubernetes-int-or-string"] is True
    assert tp["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    assert "type" not in tp


def test_names_subresources_and_printer_columns() -> None:
    document = yaml.safe_load(crd.CRD_PATH.read_text())
    spec = document["spec"]
    assert document["metadata"]["name"] == "modeldeployments.ndif.dev"
    assert spec["group"] == "ndif.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["plural"] == "modeldeployments" and spec["names"]["shortNames"] == ["md"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["storage"] and version["served"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    columns = [c["name"].upper() for c in version["additionalPrinterColumns"] if c.get("priority", 0) == 0]
    assert columns == ["MODEL", "LEVEL", "READY", "REPLICAS", "GPUS", "MEMORY", "BOOKED-UNTIL", "AGE"]


def test_every_cel_rule_compiles_in_standard_cel() -> None:
    import celpy

    env = celpy.Environment()
    rules = [rule["rule"] for _, node in _walk(_schema()) for rule in node.get("x-kubernetes-validations", [])]
    assert len(rules) >= 5
    for rule in rules:
        env.compile(rule)  # raises on syntax outside standard CEL


def test_conditions_are_a_map_list_keyed_by_type() -> None:
    conditions = _schema()["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_rewriter_turns_null_unions_into_nullable_and_inlines_refs() -> None:
    schema = to_structural(v1alpha1.ModelSource.model_json_schema(by_alias=True))
    s3 = schema["properties"]["s3"]
    assert s3["nullable"] is True and s3["type"] == "object"
    assert s3["properties"]["bucket"]["type"] == "string"


def test_rewriter_refuses_unions_it_cannot_express() -> None:
    with pytest.raises(SchemaError, match="not structural"):
        to_structural({"anyOf": [{"type": "integer"}, {"type": "boolean"}]})
    with pytest.raises(SchemaError, match="oneOf"):
        to_structural({"oneOf": [{"type": "integer"}, {"type": "string"}]})


def test_every_generated_crd_is_committed_and_structural() -> None:
    files = crd.generated_files()
    assert {p.name for p in files} == {"modeldeployments.ndif.dev.yaml", "calendarschedules.ndif.dev.yaml"}
    for path, text in files.items():
        assert path.read_text() == text, f"{path} is stale: run `make generate`"
        assert "&id" not in text  # no YAML anchors: kubectl and Helm read it either way, people too
    calendar = yaml.safe_load(crd.CALENDAR_CRD_PATH.read_text())
    version = calendar["spec"]["versions"][0]
    assert calendar["spec"]["names"]["kind"] == "CalendarSchedule"
    assert version["subresources"] == {"status": {}}
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["required"] == ["calendarId", "credentialsSecret"]

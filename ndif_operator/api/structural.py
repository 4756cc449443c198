"""Rewrite a pydantic JSON schema into a Kubernetes *structural* OpenAPI v3 schema.

The API server rejects what pydantic emits by default:
`$ref`/`$defs` ("not supported"), `type: null` ("use nullable"), and it prunes or refuses
`additionalProperties: false` next to `properties`. This module inlines references, turns
null-unions into `nullable: true`, turns `int | "auto"` into `x-kubernetes-int-or-string`, drops
titles and null defaults, and leaves every `x-kubernetes-*` extension where the model put it.
Pure: dict in, dict out.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

_DROP_KEYS = frozenset({"title", "additionalProperties", "$defs", "definitions", "discriminator"})


class SchemaError(ValueError):
    """The pydantic schema uses a construct a structural schema cannot express."""


def to_structural(schema: Schema) -> Schema:
    """Return a structural copy of `schema` (a pydantic `model_json_schema()` result)."""
    defs: dict[str, Schema] = schema.get("$defs", {})
    return _rewrite(schema, defs, path="")


def _resolve(ref: str, defs: dict[str, Schema]) -> Schema:
    prefix = "#/$defs/"
    if not ref.startswith(prefix) or ref[len(prefix) :] not in defs:
        raise SchemaError(f"unresolvable $ref {ref!r}")
    return defs[ref[len(prefix) :]]


def _rewrite(node: Schema, defs: dict[str, Schema], path: str) -> Schema:
    if "$ref" in node:
        # Sibling keys (description, default) on the referring field win over the definition's.
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        merged = {**_resolve(node["$ref"], defs), **siblings}
        return _rewrite(merged, defs, path)

    if "anyOf" in node:
        node = _collapse_any_of(node, path)
        if "anyOf" in node or "$ref" in node:
            return _rewrite(node, defs, path) if "$ref" in node else _finish_int_or_string(node, defs, path)

    if "oneOf" in node or "allOf" in node:
        raise SchemaError(f"{path or '<root>'}: oneOf/allOf cannot be made structural; model it as object + CEL")

    out: Schema = {}
    for key, value in node.items():
        if key in _DROP_KEYS:
            continue
        if key == "default" and value is None:
            continue
        if key == "const":
            out["enum"] = [value]
            continue
        if key == "properties":
            out["properties"] = {
                name: _rewrite(sub, defs, f"{path}.{name}") for name, sub in value.items()
            }
            continue
        if key == "items":
            out["items"] = _rewrite(value, defs, f"{path}[]")
            continue
        if key == "default":
            out["default"] = _drop_nulls(value)
            continue
        out[key] = value
    if "properties" in out and "type" not in out:
        out["type"] = "object"
    return out


def _collapse_any_of(node: Schema, path: str) -> Schema:
    """`anyOf: [X, {type: null}]` → X with `nullable: true`; other unions are left for the caller."""
    options = node["anyOf"]
    non_null = [o for o in options if o.get("type") != "null"]
    rest = {k: v for k, v in node.items() if k != "anyOf"}
    if len(non_null) < len(options):
        rest["nullable"] = True
    if len(non_null) == 1:
        return {**non_null[0], **rest}
    return {**rest, "anyOf": non_null}


def _finish_int_or_string(node: Schema, defs: dict[str, Schema], path: str) -> Schema:
    types = sorted(o.get("type", "") for o in node["anyOf"])
    if types != ["integer", "string"]:
        raise SchemaError(f"{path or '<root>'}: union of {types} is not structural")
    rest = {k: v for k, v in node.items() if k != "anyOf"}
    out = _rewrite(rest, defs, path)
    # The structural form of int-or-string: no type, the extension, and bare type alternatives.
    out["x-kubernetes-int-or-string"] = True
    out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value

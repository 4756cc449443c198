"""Validate a ModelDeployment the way the API server does, offline: defaults, schema, CEL rules.

Used by the tests (every example must pass, every invalid manifest must fail with a message that
names the field and the rule), by the test API server, and by `ndif-operator plan -f` so that a
dry run rejects what `kubectl apply` would reject.

Order follows the API server: apply schema defaults, check unknown fields and the OpenAPI schema,
then evaluate `x-kubernetes-validations` (CEL). Transition rules (those reading `oldSelf`) run only
on updates, where the old object has the field. The CEL dialect is standard CEL (cel-python);
the CRD's rules avoid Kubernetes' CEL extension libraries, which cel-python lacks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cache
from typing import Any

import jsonschema

from ndif_operator.api import crd

Schema = dict[str, Any]


@dataclass(frozen=True)
class FieldError:
    """One rejection, worded like the API server's (`spec.replicas: Invalid value: ...`)."""

    path: str
    message: str
    rule: str | None = None

    def __str__(self) -> str:
        rule = f" (rule: {self.rule})" if self.rule else ""
        return f"{self.path}: {self.message}{rule}"


@cache
def _schema() -> Schema:
    return crd.open_api_schema()


@cache
def _compile(rule: str) -> Any:
    """Compile a CEL rule once (cel-python is imported lazily: only validation needs it)."""
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def apply_defaults(obj: Any) -> Any:
    """Return a copy of `obj` with schema defaults filled in where fields are absent."""
    return _default(copy.deepcopy(obj), _schema())


def _default(value: Any, schema: Schema) -> Any:
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = _default(value[name], sub)
    elif isinstance(value, list) and "items" in schema:
        return [_default(item, schema["items"]) for item in value]
    return value


def _to_json_schema(schema: Schema) -> Schema:
    """OpenAPI v3 `nullable` → JSON Schema `type: [X, null]`; unknown fields become errors."""
    out: Schema = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: _to_json_schema(sub) for name, sub in value.items()}
        elif key == "items":
            out[key] = _to_json_schema(value)
        elif key == "anyOf":
            out[key] = [_to_json_schema(sub) for sub in value]
        elif not key.startswith("x-kubernetes-") and key != "nullable":
            out[key] = value
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and not schema.get("x-kubernetes-preserve-unknown-fields"):
        # kubectl's strict field validation rejects unknown fields instead of pruning them silently.
        out["additionalProperties"] = False
    return out


@cache
def _validator() -> jsonschema.Draft7Validator:
    schema = _to_json_schema(_schema())
    schema["properties"]["metadata"] = {"type": "object"}  # metadata is the server's business
    return jsonschema.Draft7Validator(schema)


def _json_path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _schema_errors(obj: Any) -> list[FieldError]:
    errors = []
    for err in sorted(_validator().iter_errors(obj), key=lambda e: (list(map(str, e.path)), e.message)):
        path = _json_path(err.path)
        if err.validator == "additionalProperties":
            extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
            for name in extra:
                errors.append(FieldError(f"{path}.{name}", "field not declared in schema", "unknown field"))
            continue
        errors.append(FieldError(path, f"Invalid value: {err.message}", f"{err.validator}"))
    return errors


def _cel_errors(value: Any, old: Any, schema: Schema, path: str) -> list[FieldError]:
    from celpy.adapter import json_to_cel
    from celpy.celtypes import BoolType

    errors: list[FieldError] = []
    for rule in schema.get("x-kubernetes-validations", []):
        text = rule["rule"]
        transition = "oldSelf" in text
        if transition and old is None:
            continue
        activation = {"self": json_to_cel(value)}
        if transition:
            activation["oldSelf"] = json_to_cel(old)
        result = _compile(text).evaluate(activation)
        # A rule that errors (e.g. a missing field) rejects, as in the API server.
        if not (isinstance(result, BoolType) and bool(result)):
            where = path + rule.get("fieldPath", "")
            errors.append(FieldError(where, f"Invalid value: {rule['message']}", text))
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name in value and value[name] is not None:
                old_child = old.get(name) if isinstance(old, dict) else None
                errors.extend(_cel_errors(value[name], old_child, sub, f"{path}.{name}"))
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors.extend(_cel_errors(item, None, schema["items"], f"{path}[{index}]"))
    return errors


def validate_object(obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[FieldError]:
    """All the reasons the API server would reject `obj` (an update when `old` is given).

    `obj` is checked after defaulting, like the server does; an empty list means accepted.
    """
    defaulted = apply_defaults(obj)
    errors = _schema_errors(defaulted)
    if errors:
        return errors  # CEL runs only on schema-valid objects, as in the API server
    old_defaulted = apply_defaults(old) if old is not None else None
    schema = _schema()
    for part in ("spec", "status"):
        if part in defaulted and defaulted[part] is not None:
            old_part = old_defaulted.get(part) if old_defaulted else None
            errors.extend(_cel_errors(defaulted[part], old_part, schema["properties"][part], part))
    return errors


class ValidationFailed(ValueError):
    """A manifest the API server would reject; `errors` lists every reason."""

    def __init__(self, name: str, errors: list[FieldError]) -> None:
        self.errors = errors
        reasons = "; ".join(str(e) for e in errors)
        super().__init__(f'ModelDeployment "{name}" is invalid: {reasons}')


def check_object(obj: dict[str, Any], old: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return the defaulted object, or raise `ValidationFailed` naming every bad field."""
    errors = validate_object(obj, old)
    if errors:
        name = str(obj.get("metadata", {}).get("name", "<unnamed>"))
        raise ValidationFailed(name, errors)
    defaulted: dict[str, Any] = apply_defaults(obj)
    return defaulted

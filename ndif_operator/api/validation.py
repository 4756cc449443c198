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
    """Return a copy of `obj` as the API server stores it before validation.

    In the server's order: numbers as `kubectl` sends them (it converts YAML to JSON with
    sigs.k8s.io/yaml, which writes a whole float such as `4.0` as `4`); then nulls of fields
    that are neither nullable nor defaulted are pruned (`PruneNonNullableNullsWithoutDefaults`);
    then schema defaults fill absent fields and non-nullable nulls, recursing into what they
    fill (`defaulting.Default`). A nullable field set to null stays null.
    """
    return _default(_prune_nulls(_whole_numbers(copy.deepcopy(obj)), _schema()), _schema())


def _whole_numbers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


def _prune_nulls(value: Any, schema: Schema) -> Any:
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in value:
                continue
            if value[name] is None and not sub.get("nullable") and "default" not in sub:
                del value[name]
            else:
                value[name] = _prune_nulls(value[name], sub)
    elif isinstance(value, list) and "items" in schema:
        return [_prune_nulls(item, schema["items"]) for item in value]
    return value


def _default(value: Any, schema: Schema) -> Any:
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            absent = name not in value or (value[name] is None and not sub.get("nullable"))
            if absent and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = _default(value[name], sub)
    elif isinstance(value, list) and "items" in schema:
        return [_default(item, schema["items"]) for item in value]
    return value


def _cel_value(value: Any) -> Any:
    """The value CEL sees: a null field of an object reads as absent (`has()` is false), as in the
    API server's CEL values for objects with properties."""
    if isinstance(value, dict):
        return {k: _cel_value(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_cel_value(v) for v in value]
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
    errors: list[FieldError] = []
    for err in sorted(_validator().iter_errors(obj), key=lambda e: (list(map(str, e.path)), e.message)):
        path = _json_path(err.path)
        if err.validator == "required":
            # The server names the missing field itself: `spec.model: Required value`.
            missing = sorted(set(err.validator_value) - set(err.instance))
            errors.extend(FieldError(f"{path}.{name}" if err.path else name, "Required value", "required")
                          for name in missing)
            continue
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
    from celpy.evaluation import CELEvalError

    errors: list[FieldError] = []
    for rule in schema.get("x-kubernetes-validations", []):
        text = rule["rule"]
        transition = "oldSelf" in text
        if transition and old is None:
            continue
        activation = {"self": json_to_cel(_cel_value(value))}
        if transition:
            activation["oldSelf"] = json_to_cel(_cel_value(old))
        try:
            result = _compile(text).evaluate(activation)
        except CELEvalError as exc:
            result = exc  # the server rejects an object whose rule cannot be evaluated
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

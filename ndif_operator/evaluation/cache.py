"""The evaluator cache: (source, revision, dtype) → weights bytes + model shape.

The runtime budget depends on each deployment's limits (batch, sequence), so the cache keeps what
cannot be recomputed without I/O (weights bytes, the config-derived shape) and `estimate`
recomputes the total from it: a hit costs no I/O whatever the limits.

Persisted as ConfigMap `data` (str → str): one key per entry, its value the entry as JSON. A
ConfigMap key allows only `[-._a-zA-Z0-9]` and 253 characters, so the data key is a readable slug
plus a hash of the full cache key; the full key is stored inside the value and checked on load.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime

from ndif_operator.api import DType, ModelSpec
from ndif_operator.evaluation.shape import ModelShape

_UNSAFE = re.compile(r"[^-._a-zA-Z0-9]+")
_SCHEMA_VERSION = 2


def source_id(model: ModelSpec) -> str:
    """A canonical string naming where the checkpoint bytes come from."""
    src = model.source
    if src.local_path is not None:
        return f"file:{src.local_path.path.rstrip('/')}"
    if src.s3 is not None:
        endpoint = f"{src.s3.endpoint_url}|" if src.s3.endpoint_url else ""
        return f"s3:{endpoint}{src.s3.bucket}/{src.s3.prefix.strip('/')}"
    endpoint = src.hugging_face.endpoint if src.hugging_face and src.hugging_face.endpoint else ""
    return f"hf:{endpoint + '|' if endpoint else ''}{model.repo_id}"


def cache_key(model: ModelSpec) -> str:
    """The cache key of a model: source, revision and requested dtype."""
    return f"{source_id(model)}@{model.revision}#{DType(model.dtype).value}"


def configmap_key(key: str) -> str:
    """A valid ConfigMap data key for a cache key (stable, collision-safe)."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    slug = _UNSAFE.sub("-", key).strip("-.")[:200]
    return f"{slug}.{digest}"


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One evaluation. `method` is how it was made (an `EstimateMethod` value)."""

    key: str
    weights_bytes: int
    parameter_count: int
    method: str
    evaluated_at: datetime
    shape: ModelShape | None = None
    element_size: int = 2  # bytes per activation element in the requested dtype (budget input)

    def to_json(self) -> str:
        body = {
            "v": _SCHEMA_VERSION,
            "key": self.key,
            "weightsBytes": self.weights_bytes,
            "parameterCount": self.parameter_count,
            "method": self.method,
            "evaluatedAt": self.evaluated_at.isoformat(),
            "shape": asdict(self.shape) if self.shape is not None else None,
            "elementSize": self.element_size,
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> CacheEntry:
        try:
            body = json.loads(text)
            if body.get("v") != _SCHEMA_VERSION:
                raise ValueError(f"unsupported cache entry version {body.get('v')!r}")
            shape = body.get("shape")
            return cls(
                key=str(body["key"]),
                weights_bytes=int(body["weightsBytes"]),
                parameter_count=int(body.get("parameterCount", 0)),
                method=str(body["method"]),
                evaluated_at=datetime.fromisoformat(body["evaluatedAt"]),
                shape=ModelShape(**shape) if shape else None,
                element_size=int(body.get("elementSize", 2)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad evaluator cache entry: {exc}") from exc


class EstimateCache:
    """An in-memory cache that round-trips through ConfigMap data."""

    def __init__(self, entries: Mapping[str, CacheEntry] | None = None) -> None:
        self._entries: dict[str, CacheEntry] = dict(entries or {})
        self.dirty = False  # set by put(); the operator writes the ConfigMap back when True, then clears it

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[CacheEntry]:
        return iter(self._entries[k] for k in sorted(self._entries))

    def get(self, key: str) -> CacheEntry | None:
        return self._entries.get(key)

    def get_for(self, model: ModelSpec) -> CacheEntry | None:
        return self._entries.get(cache_key(model))

    def put(self, entry: CacheEntry) -> None:
        if self._entries.get(entry.key) != entry:
            self._entries[entry.key] = entry
            self.dirty = True

    def to_configmap_data(self) -> dict[str, str]:
        return {configmap_key(k): self._entries[k].to_json() for k in sorted(self._entries)}

    @classmethod
    def from_configmap_data(cls, data: Mapping[str, str] | None) -> EstimateCache:
        """Load entries; an unreadable or mismatched entry is skipped (it will be re-evaluated)."""
        entries: dict[str, CacheEntry] = {}
        for data_key, text in (data or {}).items():
            try:
                entry = CacheEntry.from_json(text)
            except ValueError:
                continue
            if configmap_key(entry.key) == data_key:
                entries[entry.key] = entry
        return cls(entries)


def entry_from_runtime_output(output: str) -> CacheEntry:
    """The cache entry printed by `model_runtime.meta_evaluator` (its last non-empty line).

    Raises ValueError with the runtime's own message when it reported a failure.
    """
    lines = [line for line in output.splitlines() if line.strip()]
    if not lines:
        raise ValueError("the meta-device evaluator printed nothing")
    try:
        body = json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        raise ValueError(f"the meta-device evaluator printed no JSON: {lines[-1][:200]!r}") from exc
    if isinstance(body, dict) and "error" in body:
        raise ValueError(f"the meta-device evaluator failed: {body['error']}")
    return CacheEntry.from_json(lines[-1])

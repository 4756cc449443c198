"""The node-local weight store: host copies of models' weights that outlive Serve replicas.

Serve replaces a replica whenever its `ray_actor_options` change, and the rendered WARM → HOT
change does change them (the HOT replica asks for its GPU share, the WARM one for host memory).
So the weights must not live in the replica. One detached Ray actor per node
(`ndif-weights-<node id>`, namespace `ndif-weights`) owns, per model identity, the weights as
numpy byte arrays in Ray's object store: shared memory on that node. A replica on the node maps
them with `ray.get` (zero copy: numpy views of the shared pages) and copies them to its device;
the store never touches torch, so it stays a small process.

Filling is claimed: the first replica of a model on a node that finds no entry loads from the
model's source and publishes (`put_chunk` ... `seal`); replicas that arrive meanwhile wait for
the seal instead of reading the disk too (a scale-up reads the checkpoint once per node). A claim
that makes no progress for `fill_timeout_s` lapses, so a filler that died does not block others.

An entry lives while its model is HOT or WARM: it is evicted when a replica goes COLD in place,
when the gateway's routing table makes the model COLD or drops it (`evict_models`), and when a new
identity of the same model (another revision, dtype or source) is sealed. The store holds its
objects as their owner: if the store actor dies, they go with it and the next replica loads from
the source again (correct, only slower).

This module imports no torch: the gateway calls `evict_models` too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from model_runtime.settings import RuntimeSettings

log = logging.getLogger("ray.serve")

STORE_NAMESPACE = "ndif-weights"
STORE_PREFIX = "ndif-weights-"
DEFAULT_FILL_TIMEOUT_S = 600.0


def enabled() -> bool:
    return RuntimeSettings.from_env().weight_store


def identity(fields: dict[str, Any]) -> str:
    """A stable name for what a replica would load (model key, revision, source, dtype...)."""
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{fields.get('model_key', 'model')}@{digest}"


@dataclass
class _Entry:
    model_key: str
    layout: list[dict[str, Any]]
    refs: list[Any]
    checkpoint: str
    nbytes: int
    sealed_at: float


@dataclass
class _Claim:
    holder: str
    model_key: str
    deadline: float
    refs: list[Any] = field(default_factory=list)
    nbytes: int = 0


class WeightStore:
    """The store actor's class (wrapped with `ray.remote` by `node_store`). Methods run one at a time."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._claims: dict[str, _Claim] = {}

    def lookup(self, ident: str, holder: str, model_key: str,
               fill_timeout_s: float = DEFAULT_FILL_TIMEOUT_S) -> dict[str, Any]:
        """`hit` (with the layout and the object refs), `fill` (the caller must load and publish),
        or `wait` (another replica is filling)."""
        entry = self._entries.get(ident)
        if entry is not None:
            # Nested in a list, the refs reach the caller as references (it borrows them).
            return {"state": "hit", "layout": entry.layout, "refs": list(entry.refs),
                    "checkpoint": entry.checkpoint, "nbytes": entry.nbytes}
        now = time.monotonic()
        claim = self._claims.get(ident)
        if claim is not None and claim.holder != holder and claim.deadline > now:
            return {"state": "wait"}
        self._claims[ident] = _Claim(holder, model_key, now + fill_timeout_s)
        return {"state": "fill", "fill_timeout_s": fill_timeout_s}

    def put_chunk(self, ident: str, holder: str, arrays: list[Any], fill_timeout_s: float) -> int:
        """Copy one chunk of byte arrays into an object this actor owns; returns the chunk index."""
        import ray

        claim = self._claim_of(ident, holder)
        claim.refs.append(ray.put(arrays))
        claim.nbytes += sum(int(a.nbytes) for a in arrays)
        claim.deadline = time.monotonic() + fill_timeout_s  # progress keeps the claim
        return len(claim.refs) - 1

    def seal(self, ident: str, holder: str, layout: list[dict[str, Any]], checkpoint: str) -> dict[str, Any]:
        claim = self._claim_of(ident, holder)
        del self._claims[ident]
        for other in [k for k, e in self._entries.items() if e.model_key == claim.model_key]:
            del self._entries[other]  # a new revision/dtype/source replaces the old copy
        self._entries[ident] = _Entry(claim.model_key, layout, claim.refs, checkpoint, claim.nbytes,
                                      time.time())
        log.info("weight store: %s sealed (%d bytes in %d chunks)", ident, claim.nbytes, len(claim.refs))
        return {"state": "hit", "layout": layout, "refs": list(claim.refs), "checkpoint": checkpoint,
                "nbytes": claim.nbytes}

    def abandon(self, ident: str, holder: str) -> None:
        claim = self._claims.get(ident)
        if claim is not None and claim.holder == holder:
            del self._claims[ident]

    def evict_model(self, model_key: str) -> int:
        return self._evict(lambda key: key == model_key)

    def contents(self) -> list[dict[str, Any]]:
        return [{"identity": ident, "model_key": e.model_key, "nbytes": e.nbytes, "chunks": len(e.refs),
                 "sealed_at": e.sealed_at} for ident, e in sorted(self._entries.items())]

    def _evict(self, drop: Any) -> int:
        gone = [ident for ident, e in self._entries.items() if drop(e.model_key)]
        for ident in gone:
            del self._entries[ident]  # the objects are freed once no replica borrows them
            log.info("weight store: %s evicted", ident)
        for ident in [i for i, c in self._claims.items() if drop(c.model_key)]:
            del self._claims[ident]
        return len(gone)

    def _claim_of(self, ident: str, holder: str) -> _Claim:
        claim = self._claims.get(ident)
        if claim is None or claim.holder != holder:
            raise RuntimeError(f"no fill of {ident} is claimed by {holder}")
        return claim


def store_name(node_id: str) -> str:
    return STORE_PREFIX + node_id


def node_store() -> Any | None:
    """This node's store actor (created on first use), or None when Ray is not up or it is off."""
    if not enabled():
        return None
    import ray

    if not ray.is_initialized():
        return None
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = ray.get_runtime_context().get_node_id()
    actor = ray.remote(WeightStore).options(
        name=store_name(node_id), namespace=STORE_NAMESPACE, get_if_exists=True, lifetime="detached",
        num_cpus=0, max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    )
    return actor.remote()


def all_stores() -> list[Any]:
    """Every node's store actor that exists now."""
    import ray

    handles = []
    for named in ray.util.list_named_actors(all_namespaces=True):
        if named.get("namespace") == STORE_NAMESPACE and str(named.get("name", "")).startswith(STORE_PREFIX):
            try:
                handles.append(ray.get_actor(named["name"], namespace=STORE_NAMESPACE))
            except ValueError:  # gone since the listing
                continue
    return handles


def evict_models(model_keys: list[str]) -> int:
    """On every node, drop the host copies of these models (they went COLD). Returns how many."""
    import ray

    stores = all_stores() if model_keys else []
    return sum(ray.get([store.evict_model.remote(key) for store in stores for key in sorted(model_keys)]))

"""Weight integrity after every request, checked by something a kernel cannot skip; fail closed.

    integrity = integrity_for(model._module)
    integrity.admit()            # before a request: refuses while the weights are untrusted
    ...                          # the request (the dispatch guard uses `integrity.storage`)
    integrity.verify()           # after it, whatever the outcome: raises ModelTampering if changed

The dispatch guard refuses writes it sees; this module catches the ones it cannot see (a raw
pointer handed to native code, a kernel that writes without dispatching, `.data =`). Per server
tensor it records, when armed:
* what autograd and the dispatcher track: the version counter (bumped by every in-place op);
* what the tensor is: its storage pointer and size, offset, shape, stride, dtype, conj/neg bits,
  `requires_grad` and `.grad`;
* what it holds: a content fingerprint of a sample of its storage bytes. Samples are strided
  byte views taken at one of several random offsets, chosen afresh for every check, so a
  request cannot know which bytes will be compared; a write that touches the whole tensor, or
  any sampled byte, is always seen. (A full comparison would read every weight per request.)

A mismatch marks the weights untrusted at once: the request that caused it fails, and no other
request is admitted (the check runs under the replica's request lock) until they are restored,
from a kept copy of every server storage (kept when the model is at most `keep_copy_bytes`,
default 4 GiB, in host memory), or, without a copy, by the replica being replaced (its health
check fails; Serve starts a fresh one that loads the model again).
"""

from __future__ import annotations

import logging
import operator
import random
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from model_runtime.sandbox.dispatch_guard import ServerStorage, local_shard, module_tree, server_tensors
from model_runtime.sandbox.errors import ModelTampering

_log = logging.getLogger(__name__)

KEEP_COPY_BYTES = 4 * 1024**3
_SAMPLE_BYTES = 256  # per storage and sample set
_SAMPLE_SETS = 8


def weights_and_buffers(modules: Iterable[torch.nn.Module]) -> list[torch.Tensor]:
    """The parameters and buffers of the served model, each once (tied weights once)."""
    seen: dict[int, torch.Tensor] = {}
    for module in module_tree(modules):
        for table in (module._parameters, module._buffers):
            for tensor in table.values():
                if tensor is not None:
                    seen.setdefault(id(tensor), tensor)
    return [local_shard(t) for t in seen.values()]


def _byte_view(storage: torch.UntypedStorage) -> torch.Tensor:
    raw = torch.empty(0, dtype=torch.uint8, device=storage.device)
    return raw.set_(storage)


class _Identity(NamedTuple):
    """What a server tensor is, apart from its bytes (a tuple: made and compared at C speed, for
    every server tensor after every request)."""

    ptr: int
    nbytes: int
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    conj: bool
    neg: bool
    requires_grad: bool
    has_grad: bool

    @classmethod
    def of(cls, t: torch.Tensor) -> _Identity:
        storage = t.untyped_storage()
        return cls(
            int(storage.data_ptr()), int(storage.nbytes()), int(t.storage_offset()), tuple(t.shape), tuple(t.stride()),
            t.dtype, t.is_conj(), t.is_neg(), t.requires_grad, t.grad is not None,
        )


@dataclass
class WeightIntegrity:
    modules: list[torch.nn.Module]
    keep_copy_bytes: int = KEEP_COPY_BYTES
    #: Set when a check failed and the weights are not restored yet.
    untrusted: bool = False
    #: Set when the weights could not be restored in place: the replica must be replaced.
    unrecoverable: bool = False
    storage: ServerStorage = field(default_factory=ServerStorage)
    _guarded: list[torch.Tensor] = field(default_factory=list)
    _tensors: list[torch.Tensor] = field(default_factory=list)
    _originals: list[torch.Tensor] = field(default_factory=list)  # aliases keeping each tensor's view
    _identities: list[_Identity] = field(default_factory=list)
    _versions: list[int] = field(default_factory=list)
    _storages: list[torch.UntypedStorage] = field(default_factory=list)
    _samples: list[list[torch.Tensor]] = field(default_factory=list)  # per sample set: one view per storage
    _fingerprints: list[torch.Tensor] = field(default_factory=list)
    _copies: list[torch.Tensor] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._index()

    # -- indexing -------------------------------------------------------------------------------

    def _index(self) -> None:
        """Record everything about the server's tensors as they are now (trusted)."""
        self._tensors = weights_and_buffers(self.modules)
        # The dispatch guard also protects tensors kept as plain module attributes; holding them
        # here keeps their memory from being reused for a request's tensors if the model
        # replaces one.
        self._guarded = server_tensors(self.modules)
        self.storage = ServerStorage.of(self._guarded)
        self._originals = [t.detach() for t in self._tensors]
        self._identities = [_Identity.of(t) for t in self._tensors]
        self._versions = [t._version for t in self._tensors]
        unique: dict[int, torch.UntypedStorage] = {}
        for t in self._tensors:
            storage = t.untyped_storage()
            if storage.nbytes():
                unique.setdefault(int(storage.data_ptr()), storage)
        self._storages = list(unique.values())
        views = [_byte_view(s) for s in self._storages]
        rng = random.Random()
        self._samples = []
        for _ in range(_SAMPLE_SETS):
            picked = []
            for view in views:
                n = view.numel()
                step = max(1, n // _SAMPLE_BYTES)
                picked.append(view[rng.randrange(step) :: step][:_SAMPLE_BYTES])
            self._samples.append(picked)
        with torch.no_grad():
            self._fingerprints = [torch.cat(views) if views else torch.empty(0) for views in self._samples]
            self._fingerprints = [f.clone() for f in self._fingerprints]
            total = sum(s.nbytes() for s in self._storages)
            self._copies = (
                [_byte_view(s).to("cpu", copy=True) for s in self._storages] if total <= self.keep_copy_bytes else None
            )

    def _moved(self) -> bool:
        """True when the server moved or reloaded the model since indexing (new storages)."""
        current = weights_and_buffers(self.modules)
        return len(current) != len(self._tensors) or not all(map(operator.is_, current, self._tensors))

    # -- per request ----------------------------------------------------------------------------

    def admit(self) -> None:
        """Before a request: refuse while the weights are untrusted; re-index after a legitimate
        move (WARM <-> HOT gives every tensor new storage, checked after the previous request)."""
        with self._lock:
            if self.untrusted and not self._restore():
                raise ModelTampering(
                    "this replica's weights failed an integrity check and it is not serving until it is "
                    "replaced; retry shortly"
                )
            if self._moved() or [int(t.untyped_storage().data_ptr()) for t in self._tensors] != [
                ident.ptr for ident in self._identities
            ]:
                self._index()
            else:
                self._versions = [t._version for t in self._tensors]

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The served parameters and buffers as indexed (one list until the next re-index: a
        caller may key its own per-index work on the list's identity)."""
        return self._tensors

    def problems(self) -> list[str]:
        """What differs from the recorded state (empty when the weights are intact)."""
        found: list[str] = []
        if self._moved():
            found.append("the model's set of tensors changed")
            return found
        if [t._version for t in self._tensors] != self._versions:
            found.append("a weight's version counter moved (an in-place write)")
        if [_Identity.of(t) for t in self._tensors] != self._identities:
            found.append("a weight's storage, layout or autograd flags changed")
        chosen = random.randrange(len(self._samples)) if self._samples else None
        if chosen is not None and self._samples[chosen]:
            with torch.no_grad():
                if not torch.equal(torch.cat(self._samples[chosen]), self._fingerprints[chosen]):
                    found.append("a weight's bytes changed (content fingerprint)")
        return found

    def verify(self) -> None:
        """After a request: raise ModelTampering if anything changed, after restoring the weights
        (or marking the replica for replacement). Call under the replica's request lock."""
        with self._lock:
            found = self.problems()
            if not found:
                return
            self.untrusted = True
            _log.error("weight integrity check failed: %s", "; ".join(found))
            restored = self._restore()
        detail = "restored from the kept copy" if restored else "this replica will be replaced"
        raise ModelTampering(f"the request changed the served model ({'; '.join(found)}); {detail}")

    def _restore(self) -> bool:
        if self._copies is None:
            self.unrecoverable = True
            return False
        with torch.no_grad():
            for t, original, ident in zip(self._tensors, self._originals, self._identities, strict=True):
                if _Identity.of(t) != ident:
                    t.data = original  # back onto its own storage, shape and stride
                    if t.requires_grad != ident.requires_grad:
                        t.requires_grad_(ident.requires_grad)
                    if not ident.has_grad:
                        t.grad = None
            for storage, copy in zip(self._storages, self._copies, strict=True):
                _byte_view(storage).copy_(copy)
        ok = all(_Identity.of(t) == ident for t, ident in zip(self._tensors, self._identities, strict=True)) and all(
            torch.equal(_byte_view(s).cpu(), c) for s, c in zip(self._storages, self._copies, strict=True)
        )
        if ok:
            self._versions = [t._version for t in self._tensors]
            self.untrusted = False
            _log.warning("weights restored from the kept copy")
        else:
            self.unrecoverable = True
        return ok

    @property
    def healthy(self) -> bool:
        return not self.unrecoverable


_REGISTRY: weakref.WeakKeyDictionary[torch.nn.Module, WeightIntegrity] = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()


def integrity_for(module: torch.nn.Module) -> WeightIntegrity:
    """The integrity record of a served model's root module (built, and a copy kept, on first use)."""
    with _REGISTRY_LOCK:
        record = _REGISTRY.get(module)
        if record is None:
            record = _REGISTRY[module] = WeightIntegrity([module])
        return record


def all_healthy(records: Iterable[WeightIntegrity] | None = None) -> bool:
    return all(r.healthy for r in (records if records is not None else list(_REGISTRY.values())))

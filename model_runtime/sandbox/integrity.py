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
  The tree's tables and the identities are recorded by `weight_records.py` (a small C++ reader
  where it is built). Host-memory samples are gathered by that reader too, by address, in the
  storages the index holds (where it is not built: numpy views over the same bytes, one
  `concatenate`; both about 5x cheaper per storage than `torch.cat`), and compared as one bytes
  value; they are read only after every tensor's storage pointer and size matched the record,
  so they never read memory a tensor gave up.

A mismatch marks the weights untrusted at once: the request that caused it fails, and no other
request is admitted (the check runs under the replica's request lock) until they are restored in
place, or, where they cannot be, by the replica being replaced (its health check fails; Serve
starts a fresh one that loads the model again). Each indexed storage is restored from:
* its **restore source** when it has one: the pristine bytes it was filled from, registered with
  `restore_from(module, source)` by whoever filled it. The replica registers the node's weight
  store (`model_runtime/replica/host_copy.py`): read-only numpy views of the store's shared
  memory, which every tensor copied from the store was made from. Indexing then copies nothing
  (the first request after a level move costs no second copy of the weights), and a model of any
  size stays recoverable. A tensor counts as filled from its source while it is the very object
  registered, on the storage it had then, of the source's size, and the source's bytes at the
  index's sample offsets equal the tensor's; else it gets a kept copy. The index holds the
  source's arrays (not the store's references), so its pages stay mapped for as long as the
  index may read them, even after the store evicted the model.
* else a **kept copy** of the storage in host memory, taken when indexing (when the storages
  without a source total at most `keep_copy_bytes`, default 4 GiB; else nothing is kept and
  tampering means replacement).
After restoring, the weights must equal what they were restored from and match the index's
content fingerprints, else the replica is replaced: a source that no longer holds the bytes the
weights were indexed with (corrupted, or not what they came from) fails closed. The source is
trusted as the weights are: its pages are mapped into this process (read-only views), so request
code able to write them with native code could already write the weights themselves.

The restore sources are `restore_source.RestoreSource`s.

`integrity_for(module)` keeps one record per served root module; a record holds its roots only
weakly (the registry's entries go with their model), and `forget(module)` drops one at once (the
replica calls it after every level move, which makes new tensors, and going COLD). A replica that
once failed unrecoverably stays unhealthy for the life of the process (`all_healthy`), whether
or not its record is still held.
"""

from __future__ import annotations

import logging
import operator
import random
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import InitVar, dataclass, field
from typing import Any

import numpy as np
import torch

from model_runtime.sandbox.dispatch_guard import ServerStorage, module_tree, server_tensors
from model_runtime.sandbox.errors import ModelTampering
from model_runtime.sandbox.restore_source import RestoreSource, host_view
from model_runtime.sandbox.weight_records import (
    Identity,
    TreeRecord,
    byte_view,
    identity_columns,
    identity_record,
    native_gather,
    native_identities,
    weights_of_tree,
)

_log = logging.getLogger(__name__)

# The per-request reads, bound once (attribute lookups on the hot path).
_CALL = operator.call
_TENSOR: Any = torch.Tensor
_STORAGE: Any = torch.UntypedStorage
_VERSION = operator.attrgetter("_version")

KEEP_COPY_BYTES = 4 * 1024**3
_SAMPLE_BYTES = 256  # per storage and sample set
_SAMPLE_SETS = 8


def _sample_step(nbytes: int) -> int:
    return max(1, nbytes // _SAMPLE_BYTES)


@dataclass
class WeightIntegrity:
    roots: InitVar[list[torch.nn.Module]]  # the served model's root modules, held weakly
    keep_copy_bytes: int = KEEP_COPY_BYTES
    #: Set when a check failed and the weights are not restored yet.
    untrusted: bool = False
    #: Set when the weights could not be restored in place: the replica must be replaced.
    unrecoverable: bool = False
    #: Bytes the index copied into host memory to restore from (the storages without a source).
    kept_bytes: int = 0
    #: Bytes the index restores from its restore source, without a copy.
    source_bytes: int = 0
    storage: ServerStorage = field(default_factory=ServerStorage)
    on_lost: Callable[[], None] | None = None  # called when the weights cannot be restored
    _roots: list[weakref.ref[torch.nn.Module]] = field(default_factory=list)
    _guarded: list[torch.Tensor] = field(default_factory=list)
    _tensors: list[torch.Tensor] = field(default_factory=list)
    _originals: list[torch.Tensor] = field(default_factory=list)  # aliases keeping each tensor's view
    _identities: list[Identity] = field(default_factory=list)
    _identity_columns: list[list[Any]] = field(default_factory=list)  # the same, one list per field
    _identity_record: bytes | None = None  # the same, packed by the native reader (None without it)
    _tree: TreeRecord | None = None
    _versions: list[int] = field(default_factory=list)
    _storages: list[torch.UntypedStorage] = field(default_factory=list)
    _samples: list[list[torch.Tensor]] = field(default_factory=list)  # per sample set: one view per storage
    _sample_starts: list[list[int]] = field(default_factory=list)  # per sample set: each view's first byte
    _fingerprints: list[torch.Tensor] = field(default_factory=list)
    # The same samples as numpy views and the fingerprints as bytes (host memory only; else None).
    _sample_arrays: list[list[np.ndarray[Any, Any]]] | None = None
    _fingerprint_bytes: list[bytes] = field(default_factory=list)
    # Per sample set, the native gather's plan of the same bytes (host memory with the reader built).
    _sample_plans: list[bytes] | None = None
    _copies: list[torch.Tensor] | None = None  # per storage: the bytes it is restored from
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self, roots: list[torch.nn.Module]) -> None:
        self._roots = [weakref.ref(root) for root in roots]
        self._index()

    @property
    def modules(self) -> list[torch.nn.Module]:
        """The root modules that are still alive."""
        return [root for root in map(_CALL, self._roots) if root is not None]

    # -- indexing -------------------------------------------------------------------------------

    def _index(self) -> None:
        """Record everything about the server's tensors as they are now (trusted)."""
        modules = self.modules
        tree = module_tree(modules)
        self._tensors = weights_of_tree(tree)
        self._tree = TreeRecord(tree, modules)
        # The dispatch guard also protects tensors kept as plain module attributes; holding them
        # here keeps their memory from being reused for a request's tensors if the model
        # replaces one.
        self._guarded = server_tensors(modules)
        self.storage = ServerStorage.of(self._guarded)
        self._originals = [t.detach() for t in self._tensors]
        self._identities = [Identity.of(t) for t in self._tensors]
        self._identity_columns = identity_columns(self._tensors)
        self._identity_record = identity_record(self._tensors)
        self._versions = list(map(_VERSION, self._tensors))
        unique: dict[int, tuple[torch.UntypedStorage, list[torch.Tensor]]] = {}
        for t in self._tensors:
            storage = t.untyped_storage()
            if storage.nbytes():
                unique.setdefault(int(storage.data_ptr()), (storage, []))[1].append(t)
        self._storages = [storage for storage, _ in unique.values()]
        views = [byte_view(s) for s in self._storages]
        steps = [_sample_step(view.numel()) for view in views]
        rng = random.Random()
        self._samples, self._sample_starts = [], []
        for _ in range(_SAMPLE_SETS):
            starts = list(map(rng.randrange, steps))
            self._sample_starts.append(starts)
            self._samples.append([
                view[start::step][:_SAMPLE_BYTES] for view, start, step in zip(views, starts, steps, strict=True)
            ])
        with torch.no_grad():
            self._fingerprints = [torch.cat(views) if views else torch.empty(0) for views in self._samples]
            self._fingerprints = [f.clone() for f in self._fingerprints]
            on_host = all(s.device.type == "cpu" for s in self._storages)
            self._sample_arrays = [[v.numpy() for v in views] for views in self._samples] if on_host else None
            self._fingerprint_bytes = [f.numpy().tobytes() for f in self._fingerprints] if on_host else []
            self._sample_plans = self._plans(steps) if on_host and native_gather() is not None else None
            self._copies = self._restore_copies([tensors for _, tensors in unique.values()], modules)

    def _plans(self, steps: list[int]) -> list[bytes]:
        """Per sample set, (address, step, count) per storage: the bytes its numpy views read,
        addressed in the storages the index holds (`self._storages`: never freed under it)."""
        pointers = [int(storage.data_ptr()) for storage in self._storages]
        return [
            np.array([(pointer + start, step, sample.numel()) for pointer, start, step, sample
                      in zip(pointers, starts, steps, samples, strict=True)], dtype=np.int64).tobytes()
            for starts, samples in zip(self._sample_starts, self._samples, strict=True)
        ]

    def _restore_copies(self, holders: list[list[torch.Tensor]],
                        modules: list[torch.nn.Module]) -> list[torch.Tensor] | None:
        """Per storage, the bytes to restore it from: its restore source's array where it has one
        (a view, no copy), else a kept host copy; None when the copies would exceed
        `keep_copy_bytes` (tampering then means replacement)."""
        sources = [source for source in map(_SOURCES.get, modules) if source is not None]
        pristine = self._matching_samples([
            next((a for a in (src.pristine(t) for t in tensors for src in sources) if a is not None), None)
            for tensors in holders
        ])
        without = [storage for storage, array in zip(self._storages, pristine, strict=True) if array is None]
        self.kept_bytes = sum(int(storage.nbytes()) for storage in without)
        self.source_bytes = sum(int(array.nbytes) for array in pristine if array is not None)
        if self.kept_bytes > self.keep_copy_bytes:
            self.kept_bytes = self.source_bytes = 0
            return None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return [
                byte_view(storage).to("cpu", copy=True) if array is None else host_view(array)
                for storage, array in zip(self._storages, pristine, strict=True)
            ]

    def _matching_samples(self, pristine: list[np.ndarray[Any, Any] | None]) -> list[np.ndarray[Any, Any] | None]:
        """`pristine`, with None for every array whose bytes at the index's sample offsets differ
        from the storage's (the source does not hold what the tensor holds: a kept copy instead)."""
        if all(array is None for array in pristine):
            return pristine
        matching = list(pristine)
        for chosen, starts in enumerate(self._sample_starts):
            fingerprint = (self._fingerprint_bytes[chosen] if self._fingerprint_bytes
                           else self._fingerprints[chosen].cpu().numpy().tobytes())
            at = 0
            for j, (array, start, sample) in enumerate(zip(pristine, starts, self._samples[chosen], strict=True)):
                n = sample.numel()
                if matching[j] is not None:
                    assert array is not None
                    if array[start :: _sample_step(array.nbytes)][:n].tobytes() != fingerprint[at : at + n]:
                        matching[j] = None
                at += n
        return matching

    def _moved(self) -> bool:
        """True when the model's set of parameters and buffers is not the indexed one (the server
        replaced or reloaded tensors, or a request did). The tree record answers in the usual
        case (nothing replaced); otherwise the tree is walked and its tensors compared."""
        if self._tree is not None and self._tree.unchanged():
            return False
        modules = self.modules
        tree = module_tree(modules)
        current = weights_of_tree(tree)
        if len(current) != len(self._tensors) or not all(map(operator.is_, current, self._tensors)):
            return True
        self._tree = TreeRecord(tree, modules)  # the same tensors in other tables: vouch for these from now
        return False

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
            if self._moved() or list(map(_STORAGE.data_ptr, map(_TENSOR.untyped_storage, self._tensors))) != (
                self._identity_columns[0]
            ):
                self._index()
            else:
                self._versions = list(map(_VERSION, self._tensors))

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
        if list(map(_VERSION, self._tensors)) != self._versions:
            found.append("a weight's version counter moved (an in-place write)")
        if not self._same_identities():
            found.append("a weight's storage, layout or autograd flags changed")
            return found  # (the sampled views may point at memory a tensor gave up: not read)
        if self._samples and not self._fingerprint_matches(random.randrange(len(self._samples))):
            found.append("a weight's bytes changed (content fingerprint)")
        return found

    def _same_identities(self) -> bool:
        """Whether every tensor's identity is the indexed one (the native reader when it indexed
        them; a tensor it can no longer read, e.g. one given a storage-less `.data`, differs)."""
        if self._identity_record is not None:
            try:
                return bool(native_identities()(self._tensors) == self._identity_record)
            except Exception:
                return False
        return identity_columns(self._tensors) == self._identity_columns

    def _fingerprint_matches(self, chosen: int) -> bool:
        """Whether sample set `chosen` holds the recorded bytes (call only after the identity
        columns matched: every sampled storage is then where, and as large as, it was)."""
        if not self._samples[chosen]:
            return True
        gather = native_gather() if self._sample_plans is not None else None
        if gather is not None and self._sample_plans is not None:
            return bool(gather(self._sample_plans[chosen]) == self._fingerprint_bytes[chosen])
        if self._sample_arrays is not None:
            return bool(np.concatenate(self._sample_arrays[chosen]).tobytes() == self._fingerprint_bytes[chosen])
        with torch.no_grad():
            return torch.equal(torch.cat(self._samples[chosen]), self._fingerprints[chosen])

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
        detail = "the weights were restored" if restored else "this replica will be replaced"
        raise ModelTampering(f"the request changed the served model ({'; '.join(found)}); {detail}")

    def _restore(self) -> bool:
        if self._copies is None:
            self._give_up()
            return False
        if self._tree is not None and not self._tree.unchanged():
            # A tensor or module replaced in its table: the recorded ones go back (restoring only
            # the recorded tensors' bytes would leave the replacement serving).
            self._tree.put_back()
        with torch.no_grad():
            for t, original, ident in zip(self._tensors, self._originals, self._identities, strict=True):
                if Identity.of(t) != ident:
                    t.data = original  # back onto its own storage, shape and stride
                    if t.requires_grad != ident.requires_grad:
                        t.requires_grad_(ident.requires_grad)
                    if not ident.has_grad:
                        t.grad = None
            for storage, copy in zip(self._storages, self._copies, strict=True):
                byte_view(storage).copy_(copy)
        identities = zip(self._tensors, self._identities, strict=True)
        # The bytes restored from, and (against a source that no longer holds what the weights
        # were indexed with) the index's own fingerprints of the live weights.
        ok = (
            not self._moved()
            and all(Identity.of(t) == ident for t, ident in identities)
            and all(torch.equal(byte_view(s).cpu(), c) for s, c in zip(self._storages, self._copies, strict=True))
            and all(map(self._fingerprint_matches, range(len(self._samples))))
        )
        if ok:
            self._versions = list(map(_VERSION, self._tensors))
            self.untrusted = False
            _log.warning("weights restored (%d bytes from their source, %d from the kept copy)",
                         self.source_bytes, self.kept_bytes)
        else:
            self._give_up()
        return ok

    def _give_up(self) -> None:
        self.unrecoverable = True
        if self.on_lost is not None:
            self.on_lost()

    @property
    def healthy(self) -> bool:
        return not self.unrecoverable


_REGISTRY: weakref.WeakKeyDictionary[torch.nn.Module, WeightIntegrity] = weakref.WeakKeyDictionary()
_SOURCES: weakref.WeakKeyDictionary[torch.nn.Module, RestoreSource] = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()
_LOST = threading.Event()  # set once a served model's weights could not be restored: for good


def integrity_for(module: torch.nn.Module) -> WeightIntegrity:
    """The integrity record of a served model's root module (built, and indexed, on first use)."""
    with _REGISTRY_LOCK:
        record = _REGISTRY.get(module)
        if record is None:
            record = _REGISTRY[module] = WeightIntegrity([module], on_lost=_LOST.set)
        return record


def record_of(module: torch.nn.Module) -> WeightIntegrity | None:
    """The integrity record of a served root module if it has one (never builds one)."""
    with _REGISTRY_LOCK:
        return _REGISTRY.get(module)


def forget(module: torch.nn.Module) -> None:
    """Drop the record of a served root module (its tensors were moved, replaced or released):
    the next request indexes afresh, and the old index's copies and tensors are freed now."""
    with _REGISTRY_LOCK:
        _REGISTRY.pop(module, None)


def restore_from(module: torch.nn.Module, source: RestoreSource | None) -> None:
    """Register the restore source of a served root module's tensors (None: drop it); indexes
    made from now on restore from it (see the module doc)."""
    with _REGISTRY_LOCK:
        if source is None:
            _SOURCES.pop(module, None)
        else:
            _SOURCES[module] = source


def all_healthy(records: Iterable[WeightIntegrity] | None = None) -> bool:
    """Whether every record can serve (no argument: the served models', and none ever lost)."""
    if records is None:
        return not _LOST.is_set() and all(r.healthy for r in list(_REGISTRY.values()))
    return all(r.healthy for r in records)

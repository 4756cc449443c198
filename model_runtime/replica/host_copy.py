"""A replica's model and where its host copy lives: the node's weight store, or the replica itself.

`obtain(args, load)` gives the replica a `HostCopy`:

* store hit (the model is WARM or HOT elsewhere on this node): the nnsight wrapper is built on the
  meta device from the checkpoint's config (no weights read), and the weights are mapped from the
  store's shared memory (`ray.get`, zero copy). `to_device` then does the only copy: host → device
  (on a CPU-only node, a memcpy into the replica's own tensors).
* store miss: this replica claims the fill, loads from the model's source on CPU
  (`loading.load_model`), publishes its tensors to the store in chunks and seals the entry, so
  every later replica of the model on the node (after a WARM → HOT restart, a HOT → WARM one, a
  scale-up) maps it instead of reading the checkpoint.
* no store (Ray not running, `NDIF_WEIGHT_STORE=0`, or publishing failed, e.g. the object store is
  full): the replica keeps its own CPU copy, as a process-local WARM.

WARM (`to_host`) drops the replica's own tensors back to meta when the store holds the copy.

While the replica's tensors are the ones copied from (or published to) the store, the store's
arrays are also their **restore source** for the sandbox's weight integrity
(`model_runtime/sandbox/integrity.py`): the integrity index restores tampered weights from the
store instead of keeping a second host copy of its own, so the first request after a level move
costs no copy. The source is registered after every copy to the device and dropped on `to_host`.
"""

from __future__ import annotations

import logging
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from model_runtime import weight_store
from model_runtime.replica import levels
from model_runtime.replica.loading import LoadedModel, attention_for, torch_dtype
from ndif_operator.api import ModelAppArgs

log = logging.getLogger("ray.serve")

CHUNK_BYTES = 256 * 1024**2  # one store object per chunk: bounds the extra memory while publishing
_WAIT_POLL_S = 0.2
NODE_MEMORY = "nodeMemory"  # transition source: weights mapped from the node's store


@dataclass(frozen=True)
class Slot:
    """One unique tensor: every (kind, module path, attribute) that refers to it, and its bytes."""

    names: list[tuple[str, str, str]]  # kind "p" (parameter) or "b" (buffer)
    dtype: str
    shape: list[int]
    chunk: int
    index: int

    def as_dict(self) -> dict[str, Any]:
        return {"names": [list(n) for n in self.names], "dtype": self.dtype, "shape": self.shape,
                "chunk": self.chunk, "index": self.index}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Slot:
        return cls([tuple(n) for n in raw["names"]], raw["dtype"], list(raw["shape"]),
                   int(raw["chunk"]), int(raw["index"]))


def store_identity(args: ModelAppArgs) -> str:
    return weight_store.identity({
        "model_key": args.model_key, "repo_id": args.repo_id, "revision": args.revision,
        "source": args.source.model_dump(mode="json"), "dtype": str(args.dtype),
        "trust_remote_code": args.trust_remote_code,
    })


def _unique_tensors(module: Any) -> list[tuple[Any, list[tuple[str, str, str]]]]:
    """Parameters and buffers (persistent or not) once each, with every name that refers to them
    (tied weights are one tensor with two names)."""
    found: dict[int, tuple[Any, list[tuple[str, str, str]]]] = {}
    for kind, named in (("p", module.named_parameters(remove_duplicate=False)),
                        ("b", module.named_buffers(remove_duplicate=False))):
        for name, tensor in named:
            if tensor is None:
                continue
            path, _, attr = name.rpartition(".")
            found.setdefault(id(tensor), (tensor, []))[1].append((kind, path, attr))
    return list(found.values())


def _as_bytes(tensor: Any) -> Any:
    """A CPU tensor's bytes as a flat uint8 numpy array (a view when it is contiguous)."""
    import torch

    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else flat.new_empty(0, dtype=torch.uint8).numpy()


def publish(store: Any, ident: str, holder: str, module: Any, checkpoint: str,
            fill_timeout_s: float) -> dict[str, Any]:
    """Copy `module`'s tensors (on CPU) into the store in chunks and seal the entry."""
    import ray

    slots: list[Slot] = []
    chunk: list[Any] = []
    size = 0
    chunk_index = 0
    for tensor, names in _unique_tensors(module):
        array = _as_bytes(tensor)
        slots.append(Slot(names, str(tensor.dtype).removeprefix("torch."), list(tensor.shape),
                          chunk_index, len(chunk)))
        chunk.append(array)
        size += array.nbytes
        if size >= CHUNK_BYTES:
            ray.get(store.put_chunk.remote(ident, holder, chunk, fill_timeout_s))
            chunk, size, chunk_index = [], 0, chunk_index + 1
    if chunk:
        ray.get(store.put_chunk.remote(ident, holder, chunk, fill_timeout_s))
    layout = [slot.as_dict() for slot in slots]
    sealed: dict[str, Any] = ray.get(store.seal.remote(ident, holder, layout, checkpoint))
    return sealed


def _set_tensor(module: Any, names: list[tuple[str, str, str]], tensor: Any) -> None:
    import torch

    value = torch.nn.Parameter(tensor, requires_grad=False) if names[0][0] == "p" else tensor
    for kind, path, attr in names:
        owner = module.get_submodule(path) if path else module
        if kind == "p":
            owner._parameters[attr] = value
        else:
            owner._buffers[attr] = tensor


def materialize(module: Any, slots: list[Slot], arrays: list[list[Any]], device: str) -> int:
    """Copy every tensor from the store's arrays onto `device` (the only copy); returns bytes copied."""
    import torch

    copied = 0
    with warnings.catch_warnings():
        # The shared pages are read-only: torch warns, and we only ever read them (a copy follows).
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        for slot in slots:
            dtype = getattr(torch, slot.dtype)
            array = arrays[slot.chunk][slot.index]
            if array.nbytes == 0:
                tensor = torch.empty(slot.shape, dtype=dtype, device=device)
            else:
                source = torch.frombuffer(array, dtype=torch.uint8).view(dtype).reshape(slot.shape)
                tensor = source.to(device, copy=True)
            _set_tensor(module, slot.names, tensor)
            copied += array.nbytes
    return copied


def _tensor_of(module: Any, name: tuple[str, str, str]) -> Any:
    kind, path, attr = name
    owner = module.get_submodule(path) if path else module
    return owner._parameters[attr] if kind == "p" else owner._buffers[attr]


def restore_source(module: Any, slots: list[Slot], arrays: list[list[Any]]) -> Any:
    """The store's arrays as the restore source of `module`'s tensors as it holds them now (each
    slot's tensor and the array it was copied from or published to): an integrity
    `RestoreSource`, which vouches for a tensor only while it is on the storage it has now."""
    from model_runtime.sandbox.restore_source import RestoreSource

    source = RestoreSource()
    for slot in slots:
        array = arrays[slot.chunk][slot.index]
        if array.nbytes:
            source.add(_tensor_of(module, slot.names[0]), array)
    return source


def dematerialize(module: Any, slots: list[Slot]) -> None:
    """Drop the replica's own tensors (back to meta): the store keeps the host copy."""
    import torch

    for slot in slots:
        _set_tensor(module, slot.names, torch.empty(slot.shape, dtype=getattr(torch, slot.dtype), device="meta"))


def build_skeleton(args: ModelAppArgs, checkpoint: str) -> Any:
    """The nnsight wrapper on the meta device: module tree and tokenizer, no weights read."""
    from nnsight import TransformersModel

    kwargs: dict[str, Any] = {"task": "text-generation", "dispatch": False, "dtype": torch_dtype(str(args.dtype)),
                              "trust_remote_code": args.trust_remote_code}
    if not checkpoint.startswith("/") and args.revision:
        kwargs["revision"] = args.revision
    kwargs["attn_implementation"] = attention_for(checkpoint, revision=kwargs.get("revision"),
                                                  trust_remote_code=args.trust_remote_code)
    model = TransformersModel(checkpoint, **kwargs)
    model._module.eval()  # from_pretrained returns eval mode; the meta build does not
    model._module.requires_grad_(False)
    return model


class HostCopy:
    """The replica's model. Subclasses decide where the host copy lives."""

    model: Any
    source_kind: str
    load_seconds: float
    nbytes: int = 0  # bytes of the weights (for the activation estimate)

    def to_device(self, device: str) -> str | None:
        """Put the weights on `device`; returns where they came from: `NODE_MEMORY` (copied from the
        node's store), "memory" (the replica's own host tensors moved), "resident" (already there)
        or None (not told: tensor-parallel ranks)."""
        raise NotImplementedError

    def to_host(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError


class PrivateCopy(HostCopy):
    """No store: the replica's own CPU copy is the WARM copy (moved to the device for HOT)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.model, self.source_kind, self.load_seconds = loaded.model, loaded.source_kind, loaded.load_seconds
        self.nbytes = sum(t.nbytes for t, _ in _unique_tensors(loaded.model._module))

    def to_device(self, device: str) -> str:
        levels.move_module(self.model, device)
        return "memory"

    def to_host(self) -> None:
        levels.move_module(self.model, "cpu")

    def release(self) -> None:
        levels.drop(self.model)


class StoreCopy(HostCopy):
    """The node's store holds the host copy; the replica holds at most its device copy."""

    def __init__(self, model: Any, store: Any, ident: str, answer: dict[str, Any], *, source_kind: str,
                 load_seconds: float, materialized_on: str | None) -> None:
        self.model, self.source_kind, self.load_seconds = model, source_kind, load_seconds
        self._store, self._ident = store, ident
        self._model_key = ident.split("@", 1)[0]
        self._slots = [Slot.from_dict(raw) for raw in answer["layout"]]
        self._refs = list(answer["refs"])
        self._arrays: list[list[Any]] | None = None
        self.nbytes = int(answer.get("nbytes", 0))
        self._on = materialized_on  # device of the replica's own tensors; None = meta (store only)
        if materialized_on is not None:
            self._offer_restore_source()  # the filler's own tensors: the store now holds their bytes

    def _mapped(self) -> list[list[Any]]:
        if self._arrays is None:
            import ray

            self._arrays = ray.get(self._refs)  # zero copy: views of the node's shared memory
        return self._arrays

    def to_device(self, device: str) -> str:
        if self._on == device:
            return "resident"
        source = "memory"
        if self._on is not None:  # the filler's own CPU tensors: one move, as from any host copy
            levels.move_module(self.model, device)
        else:
            materialize(self.model._module, self._slots, self._mapped(), device)
            self.model.dispatched = True  # real weights now: nnsight must not load its own
            source = NODE_MEMORY
        self._on = device
        self._offer_restore_source()
        return source

    def _offer_restore_source(self) -> None:
        """Weight integrity restores this replica's tensors from the store (no copy of its own)."""
        from model_runtime.sandbox import integrity

        try:
            source = restore_source(self.model._module, self._slots, self._mapped())
        except Exception as exc:  # e.g. a layout that does not name the module's tensors
            log.warning("weight store: not a restore source for %s (%r); integrity keeps its own copy",
                        self._ident, exc)
            source = None
        integrity.restore_from(self.model._module, source)

    def to_host(self) -> None:
        if self._on is None:
            return
        from model_runtime.sandbox import integrity

        integrity.restore_from(self.model._module, None)
        dematerialize(self.model._module, self._slots)
        self._on = None
        levels.free_device_cache()
        self._mapped()  # map the store's pages now: becoming HOT is then the copy alone

    def release(self) -> None:
        import ray

        self.to_host()
        self._arrays = None
        self._refs = []
        try:
            ray.get(self._store.evict_model.remote(self._model_key))
        except Exception as exc:  # the store is gone: nothing left to free
            log.info("weight store eviction of %s failed: %r", self._model_key, exc)


def obtain(args: ModelAppArgs, load: Callable[[], LoadedModel], *,
           fill_timeout_s: float = weight_store.DEFAULT_FILL_TIMEOUT_S) -> HostCopy:
    """The replica's model, from the node's store when it holds it (see the module doc)."""
    store = weight_store.node_store()
    if store is None:
        return PrivateCopy(load())
    import ray

    ident, holder = store_identity(args), uuid.uuid4().hex
    started = time.monotonic()
    while True:
        answer: dict[str, Any] = ray.get(store.lookup.remote(ident, holder, args.model_key, fill_timeout_s))
        if answer["state"] == "hit":
            model = build_skeleton(args, str(answer["checkpoint"]))
            copy = StoreCopy(model, store, ident, answer, source_kind=NODE_MEMORY,
                             load_seconds=time.monotonic() - started, materialized_on=None)
            copy._mapped()
            return copy
        if answer["state"] == "wait":
            if time.monotonic() - started > fill_timeout_s:
                log.warning("weight store: gave up waiting for another replica to load %s", ident)
                return PrivateCopy(load())
            time.sleep(_WAIT_POLL_S)
            continue
        return _fill(args, load, store, ident, holder, fill_timeout_s)


def _fill(args: ModelAppArgs, load: Callable[[], LoadedModel], store: Any, ident: str, holder: str,
          fill_timeout_s: float) -> HostCopy:
    try:
        loaded = load()
    except BaseException:
        store.abandon.remote(ident, holder)
        raise
    try:
        checkpoint = loaded.checkpoint or args.repo_id  # config and tokenizer for later skeletons
        answer = publish(store, ident, holder, loaded.model._module, checkpoint, fill_timeout_s)
    except Exception as exc:  # e.g. the object store is full: serve from this replica's own copy
        log.warning("weight store: could not publish %s (%r); keeping a private host copy", ident, exc)
        store.abandon.remote(ident, holder)
        return PrivateCopy(loaded)
    return StoreCopy(loaded.model, store, ident, answer, source_kind=loaded.source_kind,
                     load_seconds=loaded.load_seconds, materialized_on="cpu")

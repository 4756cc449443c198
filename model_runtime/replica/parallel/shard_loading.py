"""Load one rank's shard of a checkpoint: only its slices are read, and the bytes are counted.

transformers 5.22 loads a tensor-parallel model rank by rank: it opens every safetensors file
with `safe_open`, keeps `get_slice` handles (nothing read yet), and materialises for each
parameter only this rank's slice of a sharded tensor (`DtensorShardOperation.shard_tensor`) or
the whole of a replicated one. `counted_reads()` wraps those handles for the duration of a load
and adds up the bytes each materialisation copies out of the files, so a test (and
`bench/tp.py`) can hold each rank to (1/k of the sharded tensors + the replicated ones).

The plan is the checkpoint's own `base_model_tp_plan`, else the project's table
(`ndif_operator.api.parallel.PROJECT_TP_PLANS`), put on the config before the load so that
transformers shards by it and nnsight reads it back off the model.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from model_runtime.replica.parallel.plans import ResolvedPlan, replica_dims, resolve_plan
from model_runtime.replica.parallel.s3_slices import RemoteCheckpoint
from ndif_operator.api.attention import attention_of


@dataclass
class ReadCounter:
    """Bytes materialised from checkpoint files, per tensor name (one rank's load)."""

    by_tensor: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, nbytes: int) -> None:
        with self._lock:
            self.by_tensor[name] = self.by_tensor.get(name, 0) + nbytes

    @property
    def total(self) -> int:
        return sum(self.by_tensor.values())


class _CountingSlice:
    """A safetensors `get_slice` handle whose reads are counted."""

    def __init__(self, inner: Any, name: str, counter: ReadCounter) -> None:
        self._inner, self._name, self._counter = inner, name, counter

    def __getitem__(self, index: Any) -> Any:
        tensor = self._inner[index]
        self._counter.add(self._name, int(tensor.numel()) * int(tensor.element_size()))
        return tensor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _CountingFile:
    def __init__(self, inner: Any, counter: ReadCounter) -> None:
        self._inner, self._counter = inner, counter

    def get_slice(self, name: str) -> _CountingSlice:
        return _CountingSlice(self._inner.get_slice(name), name, self._counter)

    def get_tensor(self, name: str) -> Any:
        tensor = self._inner.get_tensor(name)
        self._counter.add(name, int(tensor.numel()) * int(tensor.element_size()))
        return tensor

    def __enter__(self) -> _CountingFile:
        self._inner.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._inner.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def counted_reads(remote: RemoteCheckpoint | None = None) -> Iterator[ReadCounter]:
    """Count what transformers reads from safetensors files inside this block (this process).

    With `remote`, the files it stands for are read from S3 by byte ranges instead."""
    import transformers.modeling_utils

    modeling_utils: Any = transformers.modeling_utils  # safe_open is not in its typed exports

    counter = ReadCounter()
    with _PATCH_LOCK:
        original = modeling_utils.safe_open

        def counting_open(*args: Any, **kwargs: Any) -> _CountingFile:
            if remote is not None and remote.covers(args[0] if args else kwargs.get("filename")):
                return _CountingFile(remote.open(args[0] if args else kwargs["filename"]), counter)
            return _CountingFile(original(*args, **kwargs), counter)

        modeling_utils.safe_open = counting_open
        try:
            yield counter
        finally:
            modeling_utils.safe_open = original


@dataclass(frozen=True)
class ShardLoad:
    module: Any  # the sharded transformers model (parameters are DTensors)
    plan: ResolvedPlan
    bytes_read: int
    bytes_by_tensor: dict[str, int]
    seconds: float


def load_shard(checkpoint: str, *, tensor_parallel_size: int, dtype: Any, device: str,
               trust_remote_code: bool = False, revision: str | None = None) -> ShardLoad:
    """This rank's shard of `checkpoint`, sharded by transformers over the initialised process group.

    Every rank of the group must call this at the same time (the mesh is built collectively).
    Raises ValueError (before reading any weight) for a layout the model cannot take.
    """
    import transformers.distributed
    from transformers import AutoConfig, AutoModelForCausalLM

    distributed: Any = transformers.distributed  # DistributedConfig is not in its typed exports
    auto: Any = AutoModelForCausalLM  # untyped classmethods

    started = time.monotonic()
    config = AutoConfig.from_pretrained(checkpoint, revision=revision, trust_remote_code=trust_remote_code)
    replica_dims(config, tensor_parallel_size)  # refuses impossible layouts, naming what does not divide
    plan = resolve_plan(config)
    if plan.source == "project":
        text = getattr(config, "text_config", None) or config
        text.base_model_tp_plan = dict(plan.plan)
    # The implementation the estimator budgets for (`ndif_operator.api.attention`).
    kwargs: dict[str, Any] = {"config": config, "dtype": dtype, "trust_remote_code": trust_remote_code,
                              "attn_implementation": attention_of(config).value,
                              "distributed_config": distributed.DistributedConfig(tp_size=tensor_parallel_size)}
    if revision:
        kwargs["revision"] = revision
    remote = RemoteCheckpoint.find(checkpoint)  # an S3 index: this rank's byte ranges only
    with counted_reads(remote) as counter:
        module: Any = auto.from_pretrained(checkpoint, **kwargs)
    if remote is not None:  # every byte fetched from S3 counts: the files' headers too
        counter.add("<safetensors headers>", remote.fetched - counter.total)
    if device != "cpu":
        module.to(device)
    module.eval()
    module.requires_grad_(False)
    return ShardLoad(module=module, plan=plan, bytes_read=counter.total, bytes_by_tensor=dict(counter.by_tensor),
                     seconds=time.monotonic() - started)

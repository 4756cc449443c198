"""What each rank of a tensor-parallel replica runs: its shard wrapped for nnsight, a request on it
(the same `execution.execute_request` and sandbox as a single-device replica), its level moves,
and, for ranks 1..k-1, the Ray actor (`ShardRank`) that rank 0 drives (ranks.py).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from model_runtime.replica import execution, levels
from model_runtime.replica.execution import Envelope, ExecutionLimits, ExecutionResult
from model_runtime.replica.garbage import freeze_long_lived
from model_runtime.replica.loading import pick_device, torch_dtype
from model_runtime.replica.parallel.group import collectives_issued, join_group, leave_group, rejoin_group
from model_runtime.replica.parallel.shard_loading import ShardLoad, load_shard
from model_runtime.sandbox.process_filter import confine_replica
from ndif_operator.api import ModelAppArgs


@dataclass
class RankModel:
    """What one rank holds: its nnsight wrapper over its shard of the weights."""

    model: Any
    shard: ShardLoad

    @property
    def nbytes(self) -> int:
        import torch

        total = 0
        for p in self.model._module.parameters():
            local = getattr(p, "_local_tensor", p)
            total += int(local.numel()) * int(local.element_size()) if isinstance(local, torch.Tensor) else 0
        return total


def load_rank(args: ModelAppArgs, checkpoint: str, device: str) -> RankModel:
    """This rank's shard wrapped for nnsight (every rank calls it at the same time)."""
    from nnsight import TransformersModel
    from transformers import AutoTokenizer

    from model_runtime.replica.parallel.vocab_handoff import install_vocab_handoff
    from model_runtime.replica.parallel.whole_weights import install_whole_weights

    if device == "cuda":
        levels.limit_gpu_share(args.gpu_fraction)  # before the first allocation on the shared GPU
    shard = load_shard(checkpoint, tensor_parallel_size=args.tensor_parallel_size,
                       dtype=torch_dtype(str(args.dtype)), device="cpu",
                       trust_remote_code=args.trust_remote_code)
    shard.module.to("cpu")  # built in CPU RAM first: the WARM copy (transformers may load onto the GPU)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=args.trust_remote_code)
    install_whole_weights()  # weights read inside a trace come back whole and read-only
    install_vocab_handoff()  # a vocabulary-parallel embedding's output reads and edits whole
    return RankModel(model=TransformersModel(shard.module, tokenizer=tokenizer), shard=shard)


def run_on_rank(model: Any, blob: bytes, envelope: dict[str, Any], limits: ExecutionLimits,
                on_log: Any = None, stop: threading.Event | None = None) -> ExecutionResult:
    """The request on this rank, exactly as a single-device replica runs it (sandbox included)."""
    return execution.execute_request(model, blob, Envelope.model_validate(envelope), limits=limits,
                                     on_log=on_log or (lambda _line: None), runner=execution.select_runner(),
                                     stop=stop)


def move_rank(held: RankModel | None, where: str, device: str) -> RankModel | None:
    """One rank's level move ("device", "host" or "release"); returns what the rank still holds."""
    if held is None:
        return None
    if where == "device":
        levels.move_module(held.model, device)
    elif where == "host":
        levels.move_module(held.model, "cpu")
    else:
        levels.drop(held.model)
        return None
    return held


class ShardRank:
    """Rank i (1..k-1) of one replica, as a Ray actor owned by the replica (`ray.remote` lazily)."""

    def __init__(self, rank: int, world: int) -> None:
        from model_runtime.replica.app import _prepare_process

        _prepare_process()
        self.rank, self.world = rank, world
        self.held: RankModel | None = None
        self.device = "cpu"
        self.stop_event = threading.Event()  # the current request's (ShardRank.stop sets it)
        self.request_no = 0
        self.stopped_up_to = 0  # requests are numbered by rank 0; a stop may arrive before its request
        self._stop_lock = threading.Lock()

    def start(self, args: dict[str, Any], checkpoint: str, port: int) -> dict[str, Any]:
        parsed = ModelAppArgs.model_validate(args)
        self.device = pick_device(parsed.gpus_per_replica)
        join_group(self.rank, self.world, port, self.device)
        loaded = self.load(args, checkpoint)
        confine_replica(f"rank {self.rank} of {parsed.model_key}", self.device)  # as rank 0 is
        return loaded

    def load(self, args: dict[str, Any], checkpoint: str) -> dict[str, Any]:
        self.held = load_rank(ModelAppArgs.model_validate(args), checkpoint, self.device)
        freeze_long_lived()  # as rank 0 does: per-request gc then walks only what requests made
        return {"rank": self.rank, "bytes_read": self.held.shard.bytes_read, "seconds": self.held.shard.seconds}

    def execute(self, blob: bytes, envelope: dict[str, Any], limits: dict[str, Any],
                sandbox_limits: dict[str, Any] | None = None, request_no: int = 0) -> dict[str, Any]:
        from model_runtime.sandbox.executor import sandbox_healthy

        with self._stop_lock:
            self.stop_event, self.request_no = threading.Event(), request_no
            if request_no <= self.stopped_up_to:  # rank 0 stopped it before it reached this rank
                issued = collectives_issued()
                leave_group()
                return {"ok": False, "error": "stopped before it started on this rank", "timed_out": True,
                        "wedged": False, "collectives": issued}
        if sandbox_limits is not None:  # rank 0's ModelDeployment limits, so every rank refuses alike
            from model_runtime.sandbox.executor import configure
            from model_runtime.sandbox.limits import Limits

            configure(Limits(**sandbox_limits))
        if self.held is None:
            return {"ok": False, "error": f"rank {self.rank} holds no model", "timed_out": False, "wedged": False,
                    "collectives": collectives_issued()}
        result = run_on_rank(self.held.model, blob, envelope, ExecutionLimits(**limits), stop=self.stop_event)
        issued = collectives_issued()
        if self.stop_event.is_set():
            leave_group()
        if result.wedged:  # where it is stuck, for whoever reads the rank's log
            import faulthandler
            import sys

            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        return {"ok": result.result is not None, "error": result.error, "timed_out": result.timed_out,
                "wedged": result.wedged, "sandbox_healthy": sandbox_healthy(), "collectives": issued}

    def stop(self, request_no: int) -> None:
        """Rank 0 ended request `request_no`: stop it here now, or as soon as it arrives."""
        with self._stop_lock:
            self.stopped_up_to = max(self.stopped_up_to, request_no)
            if self.request_no == request_no:
                self.stop_event.set()

    def rejoin(self, port: int) -> None:
        rejoin_group(self.rank, self.world, port, self.device)

    def move(self, where: str) -> None:
        self.held = move_rank(self.held, where, self.device)
        if self.held is not None:
            freeze_long_lived()  # the moved weights are new long-lived objects

    def ping(self) -> int:
        return self.rank

    def digest(self) -> str:
        return weights_digest(self.held.model) if self.held is not None else ""


def weights_digest(model: Any) -> str:
    """sha256 over this rank's own bytes of every weight (its shard; the whole of replicated ones)."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model._module.state_dict().items()):
        local = getattr(tensor, "_local_tensor", tensor).detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(local.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

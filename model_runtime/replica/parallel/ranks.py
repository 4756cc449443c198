"""The ranks of a tensor-parallel replica: rank 0 is the Serve replica, ranks 1..k-1 actors it owns.

    copy = start_ranks(args)        # a HostCopy: .model is rank 0's nnsight wrapper over its shard
    copy.execute_request(...)       # every rank runs the request; rank 0's result is the answer
    copy.check_ranks()              # raises when a rank died or the ranks fell out of step

Placement: the renderer gives the replica a STRICT_PACK placement group of k bundles; Serve puts
the replica (rank 0) in bundle 0 and rank i goes to bundle i, asking for exactly that bundle's CPU
and GPU (`PlacementGroupSchedulingStrategy` with the replica's current group). The actors are
owned by the replica process, so Ray kills them when it exits (replaced, scaled down, app
deleted): nothing is orphaned.

Process group: rank 0 opens a `TCPStore` on port 0 of the loopback address (the kernel picks a
free port, so replicas on one node never collide; STRICT_PACK keeps all ranks on one node) and
the others join it; gloo on CPU, NCCL on GPU; every collective times out after
`NDIF_TP_COLLECTIVE_TIMEOUT_SECONDS` (default 120), so a dead rank cannot hang the others.

Requests: rank 0 hands the same blob and envelope to every shard actor, then runs it itself; each
rank deserialises and executes it under its own sandbox (`select_runner()`), and nnsight 0.8.1's
TP support (`TPFragments`) shows every rank whole tensors, so user code takes the same path on
every rank and the collectives stay matched. Only rank 0's events reach the user. Ranks that end
differently (one completed, another failed), a dead rank, or a timeout (the async stop lands at a
different point on each rank, so their collectives may be out of step) make the replica unhealthy:
Serve replaces it, and the user gets a clear ERROR.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from model_runtime.replica import execution, levels
from model_runtime.replica.execution import Envelope, ExecutionLimits, ExecutionResult
from model_runtime.replica.host_copy import HostCopy
from model_runtime.replica.loading import pick_device, resolve_checkpoint, torch_dtype
from model_runtime.replica.parallel.shard_loading import ShardLoad, load_shard
from model_runtime.sandbox.process_filter import confine_replica
from model_runtime.settings import RuntimeSettings
from ndif_operator.api import ModelAppArgs

log = logging.getLogger("ray.serve")

_START_TIMEOUT_S = 900.0
_SHARD_ANSWER_MARGIN_S = 30.0


def tcp_store(*args: Any, **kwargs: Any) -> Any:
    """torch's TCPStore (not in torch.distributed's typed exports), on its own socket threads.

    Not on libuv: libuv sets up io_uring rings, which the replica's process filter refuses once the
    model is loaded (sandbox/process_filter.py); the libuv store then aborted the process at its
    next `io_uring_enter`, and UV_USE_IO_URING=0 did not stop it."""
    import torch.distributed

    distributed: Any = torch.distributed
    return distributed.TCPStore(*args, use_libuv=False, **kwargs)


def collective_timeout_s() -> float:
    return RuntimeSettings.from_env().tp_collective_timeout_s


def _master_addr() -> str:
    # All ranks of a replica share one node (STRICT_PACK): by default they meet on its loopback.
    return RuntimeSettings.from_env().tp_master_addr


def join_group(rank: int, world: int, port: int, device: str, store: Any = None) -> None:
    """Join the replica's process group (rank 0 passes the store it opened)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=collective_timeout_s())
    backend = "nccl" if device == "cuda" else "gloo"
    if backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # peers are on this node: stay on loopback
    # transformers reads these when it builds its device mesh; each rank sees only its own GPU.
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0"})
    if store is None:
        store = tcp_store(_master_addr(), port, world, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    if backend == "nccl":
        # The communicator is made at its first collective and opens /dev/shm segments then: make it
        # now, while the process may still open files for writing (sandbox/process_filter.py).
        import torch

        dist.all_reduce(torch.zeros(1, device="cuda"))


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

    if device == "cuda":
        levels.limit_gpu_share(args.gpu_fraction)  # before the first allocation on the shared GPU
    shard = load_shard(checkpoint, tensor_parallel_size=args.tensor_parallel_size,
                       dtype=torch_dtype(str(args.dtype)), device="cpu",
                       trust_remote_code=args.trust_remote_code)
    shard.module.to("cpu")  # built in CPU RAM first: the WARM copy (transformers may load onto the GPU)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=args.trust_remote_code)
    return RankModel(model=TransformersModel(shard.module, tokenizer=tokenizer), shard=shard)


def run_on_rank(model: Any, blob: bytes, envelope: dict[str, Any], limits: ExecutionLimits,
                on_log: Any = None) -> ExecutionResult:
    """The request on this rank, exactly as a single-device replica runs it (sandbox included)."""
    return execution.execute_request(model, blob, Envelope.model_validate(envelope), limits=limits,
                                     on_log=on_log or (lambda _line: None), runner=execution.select_runner())


class ShardRank:
    """Rank i (1..k-1) of one replica, as a Ray actor owned by the replica (`ray.remote` lazily)."""

    def __init__(self, rank: int, world: int) -> None:
        from model_runtime.replica.app import _prepare_process

        _prepare_process()
        self.rank, self.world = rank, world
        self.held: RankModel | None = None
        self.device = "cpu"

    def start(self, args: dict[str, Any], checkpoint: str, port: int) -> dict[str, Any]:
        parsed = ModelAppArgs.model_validate(args)
        self.device = pick_device(parsed.gpus_per_replica)
        join_group(self.rank, self.world, port, self.device)
        loaded = self.load(args, checkpoint)
        confine_replica(f"rank {self.rank} of {parsed.model_key}", self.device)  # as rank 0 is
        return loaded

    def load(self, args: dict[str, Any], checkpoint: str) -> dict[str, Any]:
        self.held = load_rank(ModelAppArgs.model_validate(args), checkpoint, self.device)
        return {"rank": self.rank, "bytes_read": self.held.shard.bytes_read, "seconds": self.held.shard.seconds}

    def execute(self, blob: bytes, envelope: dict[str, Any], limits: dict[str, Any]) -> dict[str, Any]:
        from model_runtime.sandbox.executor import sandbox_healthy

        if self.held is None:
            return {"ok": False, "error": f"rank {self.rank} holds no model", "timed_out": False, "wedged": False}
        result = run_on_rank(self.held.model, blob, envelope, ExecutionLimits(**limits))
        return {"ok": result.result is not None, "error": result.error, "timed_out": result.timed_out,
                "wedged": result.wedged, "sandbox_healthy": sandbox_healthy()}

    def move(self, where: str) -> None:
        if self.held is None:
            return
        if where == "device":
            levels.move_module(self.held.model, self.device)
        elif where == "host":
            levels.move_module(self.held.model, "cpu")
        else:
            levels.drop(self.held.model)
            self.held = None

    def ping(self) -> int:
        return self.rank

    def digest(self) -> str:
        return weights_digest(self.held.model) if self.held is not None else ""


def _replica_name() -> str:
    import uuid

    try:
        from ray import serve

        context = serve.get_replica_context()
        return f"{context.app_name}-{context.replica_id.unique_id}"
    except Exception:  # not inside a Serve replica (a bench or a test driving ranks directly)
        return uuid.uuid4().hex[:8]


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


def _spawn_shards(world: int) -> list[Any]:
    """Actors for ranks 1..world-1, each in its own bundle of the replica's placement group."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    remote = ray.remote(ShardRank)
    group = ray.util.get_current_placement_group()
    prefix = f"ndif-tp-{_replica_name()}"
    bundles = group.bundle_specs if group is not None else []
    actors = []
    for rank in range(1, world):
        options: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 4}  # ping answers while executing
        if group is not None and rank < len(bundles):
            bundle = bundles[rank]
            options.update(num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                           scheduling_strategy=PlacementGroupSchedulingStrategy(
                               placement_group=group, placement_group_bundle_index=rank))
        # Named (by replica and rank) so that operators can find a replica's ranks in the dashboard.
        actors.append(remote.options(name=f"{prefix}-rank{rank}", **options).remote(rank, world))
    return actors


class TensorParallelCopy(HostCopy):
    """A TP replica's model: rank 0's shard here, ranks 1..k-1 in actors; levels move every rank."""

    def __init__(self, args: ModelAppArgs) -> None:
        self.args = args
        self.world = args.tensor_parallel_size
        self.device = pick_device(args.gpus_per_replica)
        self.actors: list[Any] = []
        self.broken: str | None = None
        self.bytes_read: dict[int, int] = {}
        self.checkpoint, self.source_kind = resolve_checkpoint(args)  # S3: staged once for the node
        self.held: RankModel | None = None
        self.load_seconds = 0.0

    # --- start / load ---------------------------------------------------------------------

    def start(self) -> None:
        import ray

        started = time.monotonic()
        timeout = datetime.timedelta(seconds=collective_timeout_s())
        # Port 0: the kernel picks a free port, so replicas on one node never collide.
        store = tcp_store(_master_addr(), 0, self.world, is_master=True, wait_for_workers=False,
                              timeout=timeout)
        self.actors = _spawn_shards(self.world)
        try:
            args = self.args.model_dump(mode="json")
            refs = [a.start.remote(args, self.checkpoint, store.port) for a in self.actors]
            join_group(0, self.world, store.port, self.device, store=store)
            self.held = load_rank(self.args, self.checkpoint, self.device)
            answers = ray.get(refs, timeout=_START_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise
        self._store = store  # rank 0 serves the store for the group's lifetime
        self._loaded(answers, started)

    def reload(self) -> None:
        """COLD → HOT again: every rank loads its shard anew (the process group stays)."""
        import ray

        started = time.monotonic()
        args = self.args.model_dump(mode="json")
        refs = [a.load.remote(args, self.checkpoint) for a in self.actors]
        self.held = load_rank(self.args, self.checkpoint, self.device)
        self._loaded(ray.get(refs, timeout=_START_TIMEOUT_S), started)

    def _loaded(self, answers: list[dict[str, Any]], started: float) -> None:
        assert self.held is not None
        self.model = self.held.model
        self.nbytes = self.held.nbytes
        self.bytes_read = {0: self.held.shard.bytes_read, **{int(a["rank"]): int(a["bytes_read"]) for a in answers}}
        self.load_seconds = time.monotonic() - started
        log.info("tensor-parallel replica of %s: %d ranks, plan from %s, bytes read per rank %s",
                 self.args.model_key, self.world, self.held.shard.plan.source, self.bytes_read)

    # --- levels (HostCopy) ------------------------------------------------------------------

    def _on_every_rank(self, where: str) -> None:
        import ray

        refs = [a.move.remote(where) for a in self.actors]
        if self.held is not None:
            if where == "device":
                levels.move_module(self.held.model, self.device)
            elif where == "host":
                levels.move_module(self.held.model, "cpu")
            else:
                levels.drop(self.held.model)
                self.held = None
        ray.get(refs, timeout=_START_TIMEOUT_S)

    def to_device(self, device: str) -> None:
        self._on_every_rank("device")

    def to_host(self) -> None:
        self._on_every_rank("host")

    def release(self) -> None:
        self._on_every_rank("release")

    # --- requests ----------------------------------------------------------------------------

    def execute_request(self, model: Any, blob: bytes, envelope: Envelope, *, limits: ExecutionLimits,
                        on_log: Any, runner: Any = None) -> ExecutionResult:
        """`execution.execute_request` on every rank; rank 0's result, unless the ranks disagree."""
        import ray

        if self.broken is not None:
            return ExecutionResult(error=f"This tensor-parallel replica is being replaced ({self.broken}); "
                                         "retry shortly.", meta={"runtime": 0.0})
        shard_limits = {"timeout_seconds": limits.timeout_seconds, "max_result_bytes": limits.max_result_bytes,
                        "cancel_grace_seconds": limits.cancel_grace_seconds}
        refs = [a.execute.remote(blob, envelope.model_dump(), shard_limits) for a in self.actors]
        result = run_on_rank(model, blob, envelope.model_dump(), limits, on_log)
        deadline = time.monotonic() + limits.timeout_seconds + limits.cancel_grace_seconds + _SHARD_ANSWER_MARGIN_S
        problems: list[str] = []
        for rank, ref in enumerate(refs, start=1):
            try:
                answer = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                problems.append(f"rank {rank} did not finish")
                continue
            except ray.exceptions.RayError as exc:
                problems.append(f"rank {rank} died ({type(exc).__name__})")
                continue
            if answer["timed_out"] or answer["wedged"] or result.timed_out:
                problems.append(f"rank {rank} was stopped by the timeout")
            elif answer["ok"] != (result.result is not None):
                problems.append(f"rank {rank} ended differently ({answer['error'] or 'completed'})")
            if not answer.get("sandbox_healthy", True):
                problems.append(f"the sandbox on rank {rank} saw its weights change")
        if result.timed_out and not problems:
            problems.append("rank 0 was stopped by the timeout")
        if not problems:
            return result
        self.broken = "; ".join(problems)
        log.error("tensor-parallel replica of %s is out of step: %s", self.args.model_key, self.broken)
        if result.timed_out:
            return result  # the user's answer is the timeout; the replica is replaced behind it
        return ExecutionResult(
            error=f"A tensor-parallel rank of this model failed during your request ({self.broken}). "
                  "The replica is being replaced; retry shortly.",
            meta=result.meta,
        )

    def weight_digests(self) -> list[str]:
        """Each rank's sha256 over its own weights, rank 0 first (for operators and tests)."""
        import ray

        mine = weights_digest(self.held.model) if self.held is not None else ""
        return [mine, *ray.get([a.digest.remote() for a in self.actors], timeout=_START_TIMEOUT_S)]

    def check_ranks(self) -> None:
        """Raise (so Serve replaces the replica) when a rank died or the ranks are out of step."""
        import ray

        if self.broken is None and self.actors:
            try:
                ray.get([a.ping.remote() for a in self.actors], timeout=30)
            except ray.exceptions.RayError as exc:
                self.broken = f"a rank is gone ({type(exc).__name__})"
        if self.broken is not None:
            raise RuntimeError(f"tensor-parallel replica must be replaced: {self.broken}")

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass
        self.actors = []


def obtain_ranks(args: ModelAppArgs, current: HostCopy | None) -> TensorParallelCopy:
    """The replica's ranks with their shards loaded: started on first use, reloaded after COLD."""
    if isinstance(current, TensorParallelCopy) and current.actors:
        current.reload()
        return current
    copy = TensorParallelCopy(args)
    copy.start()
    return copy

"""The ranks of a tensor-parallel replica: rank 0 is the Serve replica, ranks 1..k-1 actors it owns.

    copy = obtain_ranks(args, None) # a HostCopy: .model is rank 0's nnsight wrapper over its shard
    copy.execute_request(...)       # every rank runs the request; rank 0's result is the answer
    copy.check_ranks()              # raises when a rank died or the ranks fell out of step

What each rank runs (its shard, a request on it, its moves, the actor of ranks 1..k-1) is in
shard_rank.py; this module is rank 0's side: starting the ranks and driving them.

Placement: the renderer gives the replica a STRICT_PACK placement group of k bundles; Serve puts
the replica (rank 0) in bundle 0 and rank i goes to bundle i, asking for exactly that bundle's CPU
and GPU (`PlacementGroupSchedulingStrategy` with the replica's current group). The actors are
owned by the replica process, so Ray kills them when it exits (replaced, scaled down, app
deleted): nothing is orphaned.

Process group (model_runtime/replica/parallel/group.py): rank 0 opens a `TCPStore` on a free loopback
port and the others join it; gloo on CPU, NCCL on GPU; every collective times out after
`NDIF_TP_COLLECTIVE_TIMEOUT_SECONDS` (default 120), so a dead rank cannot hang the others.

Requests: rank 0 hands the same blob and envelope to every shard actor, then runs it itself; each
rank deserialises and executes it under its own sandbox (`select_runner()`), and nnsight 0.8.1's
TP support (`TPFragments`) shows every rank whole tensors, so user code takes the same path on
every rank and the collectives stay matched. Only rank 0's events reach the user. A user
exception ends the request on every rank at the same point (the code is the same). A timeout is
rank 0's decision, applied on every rank at once (model_runtime/replica/parallel/stopping.py); after any
stop, or when the ranks issued different numbers of collectives, the ranks rebuild their process
group, so the replica keeps serving on the same ranks. A dead rank, a request thread that could
not be stopped, or a sandbox that saw weights change makes the replica unhealthy: Serve replaces
it, and the user gets a clear ERROR.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from model_runtime.replica import execution
from model_runtime.replica.execution import Envelope, ExecutionLimits, ExecutionResult
from model_runtime.replica.gpu_binding import rank_actor_options
from model_runtime.replica.host_copy import HostCopy
from model_runtime.replica.loading import pick_device, resolve_checkpoint
from model_runtime.replica.parallel.group import (
    collectives_issued,
    join_group,
    leave_group,
    open_store,
    rejoin_group,
    release_blocked_peers,
)
from model_runtime.replica.parallel.shard_rank import (
    RankModel,
    ShardRank,
    load_rank,
    move_rank,
    run_on_rank,
    weights_digest,
)
from model_runtime.replica.parallel.stopping import TIMEOUT, RequestStop
from ndif_operator.api import ModelAppArgs

log = logging.getLogger("ray.serve")

_START_TIMEOUT_S = 900.0
# Rank 0 stops every rank (RequestStop); a shard's own clock is only a safety net behind it.
_SHARD_SAFETY_MARGIN_S = 30.0
# How long the shard ranks may take to finish once rank 0 has (they run in lockstep with it:
# only the work after the last collective, e.g. encoding the saves, is left).
_STRAGGLER_S = 15.0
_REGROUP_TIMEOUT_S = 60.0
# After a stop, a shard that has not answered within this is blocked in a collective (a stopped
# request in Python ends within milliseconds); rank 0 then releases it (group.release_blocked_peers).
_RELEASE_AFTER_S = 2.0
# The shards' grace after a stop covers that wait (a single-device request gets 5 s).
_SHARD_STOP_GRACE_S = 10.0


def _replica_name() -> str:
    import uuid

    try:
        from ray import serve

        context = serve.get_replica_context()
        return f"{context.app_name}-{context.replica_id.unique_id}"
    except Exception:  # not inside a Serve replica (a bench or a test driving ranks directly)
        return uuid.uuid4().hex[:8]


def shard_actor_options(bundle: dict[str, float] | None) -> dict[str, Any]:
    """Ray options of the rank placed in `bundle`: exactly the bundle's resources (its pinned
    `ndif_gpu_<i>` share or GPU, and CPU), so the rank binds the GPU the planner chose
    (`ShardRank.__init__` → `bind_pinned_gpu`); ping, stop and rejoin answer during a request."""
    options = rank_actor_options(bundle) if bundle is not None else {"num_cpus": 0}
    return {**options, "max_concurrency": 4}


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
        options = shard_actor_options(bundles[rank] if rank < len(bundles) else None)
        if group is not None and rank < len(bundles):
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=rank)
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
        # S3: the node's index staged once; each rank GETs its own byte ranges (s3_slices.py)
        self.checkpoint, self.source_kind = resolve_checkpoint(args, by_ranges=True)
        self.held: RankModel | None = None
        self.load_seconds = 0.0
        self.regroups = 0  # process groups rebuilt after stopped requests (same ranks, same replica)
        self.requests = 0  # numbers each request, so a shard can tell which one a stop is for

    # --- start / load ---------------------------------------------------------------------

    def start(self) -> None:
        import ray

        started = time.monotonic()
        store = open_store(self.world)
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
        self.held = move_rank(self.held, where, self.device)
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
        """`execution.execute_request` on every rank; rank 0's result, unless the ranks disagree.

        Rank 0's clock decides a timeout and stops every rank (`RequestStop`); after any stop,
        or when the ranks issued different numbers of collectives, the process group is rebuilt
        so that the next request starts in step on the same ranks. Only a rank that died or
        could not be stopped, or a sandbox that saw weights change, costs the replica.
        """
        if self.broken is not None:
            return ExecutionResult(error=f"This tensor-parallel replica is being replaced ({self.broken}); "
                                         "retry shortly.", meta={"runtime": 0.0})
        shard_limits = {"timeout_seconds": limits.timeout_seconds + _SHARD_SAFETY_MARGIN_S,
                        "max_result_bytes": limits.max_result_bytes,
                        "cancel_grace_seconds": max(limits.cancel_grace_seconds, _SHARD_STOP_GRACE_S)}
        sandbox_limits = _sandbox_limits(runner)
        self.requests += 1
        refs = [a.execute.remote(blob, envelope.model_dump(), shard_limits, sandbox_limits, self.requests)
                for a in self.actors]
        with RequestStop(self.actors, self.requests, limits.timeout_seconds) as stop:
            result = run_on_rank(model, blob, envelope.model_dump(), limits, on_log, stop=stop.event)
            issued = {0: collectives_issued()}
            if result.timed_out:
                stop.fire(TIMEOUT)  # rank 0's own clock may run out just before the stop's timer
            if stop.fired:
                leave_group()
            answers, lost = self._shard_answers(refs, stop, limits)
        issued.update({rank: int(a.get("collectives", -1)) for rank, a in answers.items()})
        problems = self._replica_problems(result, answers, lost)
        if not problems and (stop.fired or len(set(issued.values())) > 1):
            problems = self._regroup(f"stopped ({stop.reason})" if stop.fired else f"collectives issued {issued}")
        if problems:
            self.broken = "; ".join(problems)
            log.error("tensor-parallel replica of %s must be replaced: %s", self.args.model_key, self.broken)
            if result.timed_out:
                return result  # the user's answer is the timeout; the replica is replaced behind it
            return ExecutionResult(
                error=f"A tensor-parallel rank of this model failed during your request ({self.broken}). "
                      "The replica is being replaced; retry shortly.", meta=result.meta)
        if result.timed_out and stop.reason not in (None, TIMEOUT):
            return ExecutionResult(error=f"The request was stopped on every tensor-parallel rank: {stop.reason}.",
                                   meta=result.meta)
        differing = {rank: a for rank, a in answers.items() if a["ok"] != (result.result is not None)}
        if differing and not result.timed_out:
            rank, answer = next(iter(differing.items()))
            return ExecutionResult(error=f"The tensor-parallel ranks ended your request differently: rank {rank} "
                                         f"{answer['error'] or 'completed'!s}; rank 0 "
                                         f"{result.error or 'completed'!s}", meta=result.meta)
        return result

    def _shard_answers(self, refs: list[Any], stop: RequestStop,
                       limits: ExecutionLimits) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
        """Every shard's answer (rank → answer), and the ranks lost (rank → why)."""
        import ray

        _ready, waiting = ray.wait(refs, num_returns=len(refs),
                                   timeout=_RELEASE_AFTER_S if stop.fired else _STRAGGLER_S)
        if waiting and not stop.fired:  # rank 0 is done; a shard still running is out of step with it
            stop.fire(f"{len(waiting)} rank(s) had not finished {_STRAGGLER_S:g} s after rank 0")
            leave_group()
            _ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=_RELEASE_AFTER_S)
        if waiting:  # stopped, yet still running: blocked in a collective rank 0 never entered
            released = release_blocked_peers()
            log.warning("tensor-parallel replica of %s: %d rank(s) blocked after the stop; released %d "
                        "connection(s)", self.args.model_key, len(waiting), released)
        deadline = time.monotonic() + limits.cancel_grace_seconds + _SHARD_SAFETY_MARGIN_S
        answers: dict[int, dict[str, Any]] = {}
        lost: dict[int, str] = {}
        for rank, ref in enumerate(refs, start=1):
            try:
                answers[rank] = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                lost[rank] = f"rank {rank} did not stop"
            except ray.exceptions.RayError as exc:
                lost[rank] = f"rank {rank} died ({type(exc).__name__})"
        return answers, lost

    @staticmethod
    def _replica_problems(result: ExecutionResult, answers: dict[int, dict[str, Any]],
                          lost: dict[int, str]) -> list[str]:
        """What no rebuilt group mends: a lost rank, a stuck request thread, changed weights."""
        problems = list(lost.values())
        if result.wedged:
            problems.append("rank 0's request could not be stopped")
        for rank, answer in answers.items():
            if answer["wedged"]:
                problems.append(f"rank {rank}'s request could not be stopped")
            if not answer.get("sandbox_healthy", True):
                problems.append(f"the sandbox on rank {rank} saw its weights change")
        return problems

    def _regroup(self, why: str) -> list[str]:
        """A new process group on every rank (the old one is aborted); problems if that fails."""
        import ray

        started = time.monotonic()
        try:
            store = open_store(self.world)
            refs = [a.rejoin.remote(store.port) for a in self.actors]
            rejoin_group(0, self.world, store.port, self.device, store=store)
            ray.get(refs, timeout=_REGROUP_TIMEOUT_S)
        except Exception as exc:  # the ranks cannot talk again: only a new replica helps
            return [f"the process group could not be rebuilt after the request {why} ({type(exc).__name__}: {exc})"]
        self._store = store
        self.regroups += 1
        log.warning("tensor-parallel replica of %s rebuilt its process group in %.2f s: the request %s",
                    self.args.model_key, time.monotonic() - started, why)
        return []

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


def _sandbox_limits(runner: Any) -> dict[str, Any] | None:
    """Rank 0's sandbox limits (set from its ModelDeployment), for the shard ranks' sandboxes."""
    import dataclasses

    if runner is None or runner is execution.PLAIN:
        return None
    from model_runtime.sandbox.executor import default_sandbox

    return dataclasses.asdict(default_sandbox().limits)


def obtain_ranks(args: ModelAppArgs, current: HostCopy | None) -> TensorParallelCopy:
    """The replica's ranks with their shards loaded: started on first use, reloaded after COLD."""
    if isinstance(current, TensorParallelCopy) and current.actors:
        current.reload()
        return current
    copy = TensorParallelCopy(args)
    copy.start()
    return copy

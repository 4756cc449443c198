"""The model application: one Ray Serve deployment (`ModelReplica`) serving one model.

`build_app(args)` validates `ModelAppArgs` (the operator renders them); `reconfigure(user_config)`
takes `ModelUserConfig` (level and limits) without a restart. The gateway calls, through a
DeploymentHandle:

* `execute(job_id, envelope, blob, inline_max_bytes)`: a streaming generator of event dicts
  (`{"status": "RUNNING" | "LOG" | "COMPLETED" | "ERROR", ...}`), see model_runtime/replica/events.py;
* `info()`: level, limits, queue depth, load times (for `/status` and routing);
* `activate()`: become HOT now (from WARM: a device copy; from COLD: a load), timed;
* `channel()`: the address and token of this replica's direct channel, which runs `execute` for
  the gateway without Serve's hops (model_runtime/replica/channel.py).

Requests queue inside the replica (Serve's `max_ongoing_requests` is set high) so that the queue
can be bounded by `max_queue_depth` and refused with a clear error instead of waiting in Serve;
they run one at a time because nnsight traces on one model are not thread-safe.

A tensor-parallel replica (`tensor_parallel_size` k > 1) is rank 0 of k: it owns k-1 shard actors
in its placement group and runs every request on all of them (model_runtime/replica/parallel/ranks.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from model_runtime import credentials, handoff
from model_runtime.channel_wire import FRAME_MARGIN_BYTES
from model_runtime.metrics import RuntimeMetrics, error_kind
from model_runtime.model_keys import requested_revision
from model_runtime.replica import levels
from model_runtime.replica.channel import ChannelServer
from model_runtime.replica.events import completed_event, error_event, refused_event
from model_runtime.replica.execution import (
    PLAIN,
    Envelope,
    ExecutionLimits,
    ExecutionResult,
    select_runner,
    start_request,
)
from model_runtime.replica.garbage import freeze_long_lived
from model_runtime.replica.gpu_binding import bind_pinned_gpu
from model_runtime.replica.gpu_lease import GpuLease, bind_leased_gpu
from model_runtime.replica.host_copy import NODE_MEMORY
from model_runtime.replica.parallel.ranks import TensorParallelCopy, obtain_ranks
from model_runtime.replica.parallel.shard_rank import weights_digest
from model_runtime.sandbox.process_filter import confine_replica
from model_runtime.settings import RuntimeSettings
from ndif_operator import logs
from ndif_operator.api import ModelAppArgs, ModelUserConfig
from ndif_operator.api.naming import MODEL_DEPLOYMENT

log = logging.getLogger("ray.serve")

# Serve's own admission limit; the real bound is `max_queue_depth`, enforced below.
_MAX_ONGOING = 100_000
_QUIET_RUNNING_S = 0.05  # RUNNING is sent only for jobs that take longer than this
_IMPORTED_AT = time.time()  # this module's imports (ray, serve, the runtime) are done


def _preimport_anyio() -> None:
    """anyio's TypedAttributeSet subclasses reject nnsight's global `.save` mount (runtime-on-cpu §6):
    load them before nnsight is imported in this process."""
    import importlib
    import sys

    for name in ("anyio._backends._asyncio", "anyio.abc._sockets", "anyio.streams.file", "anyio.streams.tls"):
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except TypeError as exc:  # nnsight got imported first; the pinned anyio (4.14.2) then copes
            log.warning("could not pre-import %s: %s", name, exc)


_preimport_anyio()


def _prepare_process() -> None:
    """Process-wide settings every replica needs before it loads a model."""
    # Out of the environment before anything else reads it; only what loading needs is kept, and
    # that only until the model is loaded (model_runtime/credentials.py).
    credentials.take(keep=credentials.LOADING)
    bind_pinned_gpu()  # before anything touches CUDA
    _preimport_anyio()
    import nnsight  # noqa: F401 (imported here, so that the start-up marks separate imports from loading)
    import torch

    threads = RuntimeSettings.from_env().torch_threads
    if threads > 0:
        torch.set_num_threads(threads)


@serve.deployment(name=MODEL_DEPLOYMENT, max_ongoing_requests=_MAX_ONGOING)
class ModelReplica:
    def __init__(self, args: dict[str, Any]) -> None:
        logs.setup_runtime()
        # Epoch seconds of each start-up phase (bench/runtime.py splits activation time with them).
        self._startup = {"process_started": levels.process_started_at(), "module_imported": _IMPORTED_AT,
                         "init_started": time.time()}
        _prepare_process()
        self._startup["imported"] = time.time()
        self.args = ModelAppArgs.model_validate(args)
        self.config = _deployment_user_config()  # straight to the rendered level, device and lease
        self.metrics = RuntimeMetrics()
        self.metrics.queue_depth(self.args.model_key, 0)  # reported from the start: 0, not absent, when idle
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._wedged = False
        self._model: Any = None
        self._device = "cpu"
        self._source_kind = ""
        self._level = levels.COLD
        self._transitions: list[dict[str, Any]] = []
        self._host: Any = None  # host_copy.HostCopy, set by _load
        self._lease: GpuLease | None = None  # the GPU share a HOT replica holds (config.gpu_lease)
        self._runner = select_runner()
        self._channel: asyncio.Task[ChannelServer] | None = None  # opened by the first `channel()` call
        self._configure_sandbox()
        # Load into CPU RAM (WARM); reconfigure or the first use moves it to its level.
        self._transitions.append(self._load().__dict__)
        self._startup["loaded"] = time.time()
        self._set_level(self.config.level)
        # From here on no thread of this process starts a program or writes to the file system.
        self.confined = confine_replica(f"replica of {self.args.model_key}", self._device)
        self._startup["ready"] = time.time()

    # --- levels ------------------------------------------------------------------------------

    def _load(self) -> levels.Transition:
        from model_runtime.replica.host_copy import obtain
        from model_runtime.replica.loading import load_model, pick_device

        started = time.monotonic()
        # The host copy: mapped from the node's weight store when another replica left it there,
        # else built in CPU RAM from the source and published to the store (model_runtime/replica/host_copy.py).
        cpu_args = self.args.model_copy(update={"gpus_per_replica": 0.0})
        if self.args.tensor_parallel_size > 1:  # k ranks, each holding its shard (model_runtime/replica/parallel)
            self._host = obtain_ranks(self.args, self._host)
        else:
            self._host = obtain(self.args, lambda: load_model(cpu_args))
        self._model, self._source_kind = self._host.model, self._host.source_kind
        self._device = pick_device(self.args.gpus_per_replica)
        if self._device == "cuda":
            levels.limit_gpu_share(self.args.gpu_fraction)  # one rank's share of its GPU
        self.metrics.model_load(self.args.model_key, self._source_kind, self._host.load_seconds)
        previous, self._level = self._level, levels.WARM
        freeze_long_lived()
        return levels.timed(previous, levels.WARM, self._source_kind, started)

    def _set_level(self, level: str) -> levels.Transition:
        started = time.monotonic()
        held = self._lease.resources if self._lease is not None else {}
        if level == self._level == levels.HOT and held != self.config.gpu_lease:
            self._set_level(levels.WARM)  # the planned GPU changed: leave the old one first
        current = self._level
        if level == current:
            if level == levels.WARM:
                self._host.to_host()  # a fresh replica's own copy goes once the store holds one
            return levels.timed(current, level, "resident", started)
        if level == levels.COLD:
            _forget_weight_index(self._model)  # the sandbox's index (and its copies) goes with the weights
            self._host.release()
            self._release_gpu()
            self._model, self._level = None, levels.COLD
            return levels.timed(current, level, "none", started)
        source = "memory"
        if current == levels.COLD:
            source = self._load().source
        elif self._source_kind == NODE_MEMORY:
            source = NODE_MEMORY
        if level == levels.HOT:
            self._hold_gpu()  # before the copy is timed: waiting for the GPU is not the copy
        copy_started = time.monotonic()
        if level == levels.HOT:
            if self._host.to_device(self._device) == NODE_MEMORY:  # e.g. WARM → HOT in place
                source = self._source_kind = NODE_MEMORY
        else:
            self._host.to_host()
            self._release_gpu()
        copy_seconds = time.monotonic() - copy_started
        self._level = level
        _forget_weight_index(self._model)  # the sandbox re-indexes the weights it guards: they are new tensors
        freeze_long_lived()  # the (re)placed weights leave the collected generations: cheap per-request gc
        transition = levels.timed(current, level, source, started, copy_seconds)
        if level == levels.HOT:
            self.metrics.model_load(self.args.model_key, f"activate_from_{current.lower()}", transition.seconds)
        self._transitions.append(transition.__dict__)
        return transition

    def _hold_gpu(self) -> None:
        """Reserve the planned GPU share when the config leases one (replica/gpu_lease.py)."""
        if self.config.gpu_lease and self._lease is None:
            self._lease = GpuLease(self.config.gpu_lease, model=self.args.deployment or self.args.model_key)
            self._device = bind_leased_gpu(self._lease)

    def _release_gpu(self) -> None:
        if self._lease is not None:
            from model_runtime.replica.loading import pick_device

            self._lease.release()
            self._lease = None
            self._device = pick_device(self.args.gpus_per_replica)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.config = ModelUserConfig.model_validate(user_config)
        self._configure_sandbox()
        async with self._lock:  # never move weights under a running request
            await asyncio.to_thread(self._set_level, str(self.config.level))

    def _configure_sandbox(self) -> None:
        """The ModelDeployment's limits, down to the sandbox (the one limits object)."""
        if self._runner is not PLAIN:
            from model_runtime.sandbox.executor import configure
            from model_runtime.sandbox.limits import Limits

            configure(Limits.from_config(self.config))

    async def activate(self) -> dict[str, Any]:
        """Become HOT now; returns the timed transition (cold vs warm activation)."""
        async with self._lock:
            transition = await asyncio.to_thread(self._set_level, levels.HOT)
        return dict(transition.__dict__)

    async def channel(self) -> dict[str, Any]:
        """This replica's direct channel: `{"host", "port", "token", "replica_id", "max_result_bytes"}`.

        Opened on the first call, on this loop (the one `execute` runs on), at the node's address
        on a free port. Only a caller through Serve's handle learns the token."""
        if self._channel is None:
            self._channel = asyncio.create_task(self._open_channel())
        server = await asyncio.shield(self._channel)
        return {**server.info(), "max_result_bytes": self.config.max_result_bytes}

    async def _open_channel(self) -> ChannelServer:
        import ray

        if type(asyncio.get_running_loop()).__module__.startswith("uvloop") and self.confined:
            # uvloop adds each new socket through an io_uring ring, which the process filter refuses:
            # the process would abort. The renderer gives model replicas RAY_USE_UVLOOP=0.
            raise RuntimeError("the direct channel needs asyncio's own event loop here (RAY_USE_UVLOOP=0)")
        server = ChannelServer(self.execute, lambda: self.config.max_payload_bytes + FRAME_MARGIN_BYTES,
                               serve.get_replica_context().replica_id.unique_id)
        await server.start(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
        return server

    async def set_level(self, level: str) -> dict[str, Any]:
        if level not in levels.LEVELS:
            raise ValueError(f"unknown level {level!r}; one of {levels.LEVELS}")
        async with self._lock:
            transition = await asyncio.to_thread(self._set_level, level)
        return dict(transition.__dict__)

    def info(self) -> dict[str, Any]:
        return {
            "model_key": self.args.model_key,
            "repo_id": self.args.repo_id,
            "revision": self.args.revision,
            "trust_remote_code": self.args.trust_remote_code,
            "deployment": self.args.deployment,
            "level": self._level,
            "device": self._device,
            "source": self._source_kind,
            "queue_depth": self._waiting,
            "max_queue_depth": self.config.max_queue_depth,
            "max_payload_bytes": self.config.max_payload_bytes,
            "activate_on_request": self.config.activate_on_request,
            "wedged": self._wedged,
            "gpu_lease": self._lease.resources if self._lease is not None else {},
            "transitions": list(self._transitions[-5:]),
            "bytes_read_by_rank": getattr(self._host, "bytes_read", None),  # tensor-parallel replicas
            "tp_group_rebuilds": getattr(self._host, "regroups", None),
            "startup": dict(self._startup),
            "metrics": self.metrics.snapshot(),
            "prometheus": self.metrics.exporting,
            "confined": self.confined,
            "weight_index": _weight_index(self._model),
        }

    async def weight_digests(self) -> list[str]:
        """sha256 of each rank's weights, rank 0 first (one entry on a single-device replica)."""
        async with self._lock:
            if isinstance(self._host, TensorParallelCopy):
                return await asyncio.to_thread(self._host.weight_digests)
            return [await asyncio.to_thread(weights_digest, self._model)] if self._model is not None else []

    async def __del__(self) -> None:
        # Serve awaits this at the end of the replica's graceful shutdown, once it has drained the
        # handle calls: the direct channel's requests, which Serve does not count, drain here (within
        # Serve's graceful_shutdown_timeout_s). Then the metrics' keep-alive thread stops.
        channel = getattr(self, "_channel", None)
        if channel is not None and channel.done() and not channel.cancelled() and channel.exception() is None:
            await channel.result().drain(float(self.config.request_timeout_seconds) + 5.0)
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.close()

    def check_health(self) -> None:
        # A request thread that ignored cancellation still holds the model: let Serve replace us.
        if self._wedged:
            raise RuntimeError("a timed-out request could not be stopped; this replica must be replaced")
        if isinstance(self._host, TensorParallelCopy):
            self._host.check_ranks()  # a dead rank or ranks out of step: Serve replaces the replica
        from model_runtime.sandbox.executor import sandbox_healthy  # lazy: the sandbox is optional

        if not sandbox_healthy():  # a request changed weights behind the guards: reload them
            raise RuntimeError("the sandbox saw this replica's weights change; it must be replaced")

    # --- requests ----------------------------------------------------------------------------

    async def execute(
        self, job_id: str, envelope: dict[str, Any], blob: bytes, inline_max_bytes: int = 0, chunk_bytes: int = 0
    ) -> AsyncIterator[dict[str, Any]]:
        """Run one request; yields status events. Never raises for the request's own faults.

        The first event is the admission answer, so the gateway routes from it instead of asking
        `info()` first (one handle round trip per request, not two): either QUEUED (admitted, with
        the position) or an ERROR with `http_status` (refused before admission: the gateway
        answers that HTTP error, e.g. 503 for a WARM model or a full queue). With `chunk_bytes`
        (the gateway's gRPC transport), a result larger than that comes as CHUNK events before
        its COMPLETED event (model_runtime/handoff.py).
        """
        key = self.args.model_key
        started = time.monotonic()
        timings = {"entered": time.time()}  # epoch seconds: the gateway's request-path breakdown
        refusal = self._refusal(envelope, len(blob))
        if refusal is not None:
            yield refusal
            return
        try:
            parsed = Envelope.model_validate(envelope)
        except Exception as exc:
            yield refused_event(400, f"Invalid request envelope: {exc}", self._limits())
            return
        self._waiting += 1
        # The queue depth is reported when this request waits behind another. One admitted at once
        # leaves it as it was (it would go to 1 and back within microseconds: two Ray metric records
        # on the request's way in); at admission it is reported again only if it changed.
        if self._lock.locked():
            self.metrics.queue_depth(key, self._waiting)
        admitted = False
        try:
            yield {"status": "QUEUED", "description": f"Moved to position {self._waiting} in the queue.",
                   "position": self._waiting, "limits": self._limits()}
            if self._lock.locked():  # (another request may have got in first)
                self.metrics.queue_depth(key, self._waiting)
            async with self._lock:
                self._waiting -= 1
                admitted = True
                timings["admitted"] = time.time()
                self.metrics.queue_depth(key, self._waiting)
                if self._wedged:
                    yield error_event(f"This replica of {key} is being replaced; retry shortly.")
                    return
                if self._level != levels.HOT or self._model is None:
                    yield error_event(f"Model {key} is {self._level.upper()}, not serving requests.")
                    return
                async for event in self._run(job_id, parsed, blob, inline_max_bytes):
                    if event["status"] in ("COMPLETED", "ERROR"):
                        event["timings"] = {**timings, **event.pop("marks", {}), "done": time.time()}
                        for piece in handoff.split(event, chunk_bytes):
                            yield piece
                    yield event
        finally:
            if not admitted:  # cancelled while waiting (the client went away)
                self._waiting -= 1
        log.info("job %s on %s took %.3fs", job_id, key, time.monotonic() - started)

    def _activation_eta_s(self) -> float:
        source_load = 0.0 if self._source_kind == NODE_MEMORY else float(getattr(self._host, "load_seconds", 0.0))
        return levels.activation_eta_s(self._startup, source_load, int(getattr(self._host, "nbytes", 0)),
                                       in_place=levels.activates_in_place())

    def _limits(self) -> dict[str, int]:
        # The gateway caches these to refuse an oversize body before sending it to the replica, and
        # sizes the direct channel's frame cap by the largest result.
        return {"max_payload_bytes": self.config.max_payload_bytes, "max_result_bytes": self.config.max_result_bytes}

    def _refusal(self, envelope: dict[str, Any], payload_bytes: int) -> dict[str, Any] | None:
        """Why this request cannot be admitted now, as the ERROR event the gateway turns into HTTP."""
        key = self.args.model_key
        limits = self._limits()
        if payload_bytes > self.config.max_payload_bytes:
            return refused_event(413, f"Payload of {payload_bytes} bytes exceeds this model's limit of "
                                 f"{self.config.max_payload_bytes} bytes.", limits)
        if self._wedged:
            return refused_event(503, f"Model {key!r} is restarting after a job that could not be stopped; "
                                 "retry shortly.", limits)
        wanted = requested_revision(str(envelope.get("model_key", "")))
        if wanted is not None and wanted != self.args.revision:
            return refused_event(404, f"Model {key!r} is served at revision {self.args.revision!r}, not {wanted!r}.",
                            limits)
        if self._level == levels.WARM:
            if self.config.activate_on_request:
                eta = self._activation_eta_s()
                return {**refused_event(503, f"Model {key!r} is WARM (in CPU RAM); activation to HOT was requested "
                                        f"and takes about {eta:.0f} s: retry then.", limits),
                        "activation_requested": True, "retry_after_s": eta}
            return refused_event(503, f"Model {key!r} is WARM (in CPU RAM, not serving); ask an admin to make it Hot.",
                            limits)
        if self._level != levels.HOT or self._model is None:
            return refused_event(503, f"Model {key!r} is COLD (not loaded); ask an admin to make it Hot.", limits)
        if self._waiting >= self.config.max_queue_depth:
            report = self.metrics.request(key, "rejected", 0.0, payload_bytes, 0, kind="queue_full")
            return {**refused_event(503, f"The queue for model {key!r} is full ({self.config.max_queue_depth} "
                                    "requests waiting); try again later.", limits), "report": report}
        return None

    async def _run(
        self, job_id: str, envelope: Envelope, blob: bytes, inline_max_bytes: int
    ) -> AsyncIterator[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any] | ExecutionResult] = asyncio.Queue()

        def on_log(line: str) -> None:
            loop.call_soon_threadsafe(events.put_nowait, {"status": "LOG", "description": line})

        limits = ExecutionLimits(
            timeout_seconds=float(self.config.request_timeout_seconds),
            max_result_bytes=self.config.max_result_bytes,
        )

        async def run_on_ranks() -> None:  # every rank runs it; rank 0's events are the answer
            result = await asyncio.to_thread(self._host.execute_request, self._model, blob, envelope,
                                             limits=limits, on_log=on_log, runner=self._runner)
            events.put_nowait(result)

        task = None
        if isinstance(self._host, TensorParallelCopy):
            task = asyncio.create_task(run_on_ranks())
        else:  # on the request thread when this returns; its end wakes this loop with the result
            start_request(self._model, blob, envelope, limits=limits, on_log=on_log, on_done=events.put_nowait,
                          runner=self._runner)
        running_sent = False
        item: dict[str, Any] | ExecutionResult | None = None
        try:
            while True:
                try:
                    # A job done within _QUIET_RUNNING_S goes straight to COMPLETED: one hop and one
                    # websocket frame fewer per small request. Longer jobs say RUNNING as before.
                    # (`asyncio.timeout`, not `wait_for`: no task per wait, no loop turn more.)
                    async with asyncio.timeout(None if running_sent else _QUIET_RUNNING_S):
                        item = await events.get()
                except TimeoutError:
                    item = None
                if item is None or (not running_sent and not isinstance(item, ExecutionResult)):
                    running_sent = True
                    yield {"status": "RUNNING", "description": "Your job has started running."}
                if item is None:
                    continue
                if isinstance(item, ExecutionResult):
                    break
                yield item
        finally:
            if task is not None:
                await task
            while not isinstance(item, ExecutionResult):  # left early (the client went away): the
                item = await events.get()  # model stays locked until the request is over
        result = item
        if result.wedged:
            self._wedged = True
        outcome = "completed" if result.result is not None else ("timeout" if result.timed_out else "error")
        kind = "" if result.result is not None else error_kind(result.error, timed_out=result.timed_out)
        # The figures go to the gateway in the final event; it writes them where a token is needed.
        # Prometheus gets them once that event is on its way (off the request's critical path).
        report = self.metrics.request_report(
            outcome, float(result.meta.get("runtime", 0.0)), len(blob), len(result.result or b""), kind=kind,
        )
        try:
            if result.result is None:
                failed = error_event(result.error or "unknown error", result.meta)
                yield {**failed, "report": report, "marks": result.marks}
            else:
                yield {**completed_event(job_id, result, inline_max_bytes), "report": report, "marks": result.marks}
        finally:
            self.metrics.export_request(self.args.model_key, report, kind)


def _deployment_user_config() -> ModelUserConfig:
    """The deployment's user_config, read at start so the replica goes straight to its level (and
    GPU lease) instead of through the default level; Serve then calls `reconfigure` with the same."""
    try:
        raw = serve.get_replica_context()._deployment_config.user_config
    except Exception:  # outside Serve, or Serve's internals moved: the default, then reconfigure
        raw = None
    return ModelUserConfig.model_validate(raw or {})


def _forget_weight_index(model: Any) -> None:
    """After a level move the model's tensors are new objects (mapped, copied or moved): the
    sandbox's weight guard and integrity check must index them again rather than watch the old
    ones (and let the old ones, and their restore copies, go now)."""
    import sys

    executor = sys.modules.get("model_runtime.sandbox.executor")
    sandbox = getattr(executor, "_DEFAULT", None) if executor is not None else None
    if sandbox is not None and model is not None:
        sandbox.forget(model)
    integrity = sys.modules.get("model_runtime.sandbox.integrity")
    if integrity is not None and model is not None:
        integrity.forget(model._module)


def _weight_index(model: Any) -> dict[str, int] | None:
    """What the sandbox's integrity index restores from: bytes in the node's store (no copy) and
    bytes it copied (None before the first request after a level move, or without the sandbox)."""
    import sys

    integrity = sys.modules.get("model_runtime.sandbox.integrity")
    record = integrity.record_of(model._module) if integrity is not None and model is not None else None
    return None if record is None else {"source_bytes": record.source_bytes, "kept_bytes": record.kept_bytes}


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve entry point (`import_path: model_runtime.replica.app:build_app`)."""
    validated = ModelAppArgs.model_validate(args)  # fail the deploy early on bad args
    return ModelReplica.bind(validated.model_dump(mode="json"))  # type: ignore[attr-defined,no-any-return]

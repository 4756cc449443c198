"""The sandboxed request executor: every layer, in order, around nnsight's server recipe.

    result = execute_sandboxed(model, blob, envelope, limits=Limits(), on_log=print)

The blob and the nnsight `RequestModel` envelope in; the serialised, possibly zstd-compressed
result dict out. The runtime itself uses `run_blob` below, the drop-in for
`model_runtime.replica.execution.run_blob` (its `execute_request` keeps the request thread, the
timeout, stdout capture and result encoding; `select_runner()` picks the sandbox unless
NDIF_SANDBOX=0). Steps:

1. limits: payload size, bounded decompression;
2. env: only known `attn_implementation` values (a `peft` adapter id would make the server
   download code);
3. on the dedicated worker thread (seccomp'd where supported), under the address-space cap and
   the timeout: allowlisted unpickling → validate the tracer → restricted compile of the body →
   `inc/execute/dec` with guards → weight version check → result size cap → `torch.save`;
4. always: restore process state (dtype, grad mode, RNG, sys.modules, builtins, nnsight caches).

Every refusal raises a `SandboxError` subclass whose message is safe to return to the user;
other user-code errors are raised as `RequestFailed` with the user's (cleaned) traceback.
"""

from __future__ import annotations

import contextlib
import functools
import io
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from model_runtime.bounds import CappedLog
from model_runtime.replica.execution import Runner
from model_runtime.replica.persistent_objects import persistent_objects
from model_runtime.sandbox import seccomp, sources
from model_runtime.sandbox.capabilities import Capabilities
from model_runtime.sandbox.compiling import install_compile_hook, restricted_compile, sandboxed_compilation
from model_runtime.sandbox.dispatch_guard import WriteGuard
from model_runtime.sandbox.dispatch_guard import prepare as prepare_write_guard
from model_runtime.sandbox.errors import LimitExceeded, PayloadRejected, SandboxError
from model_runtime.sandbox.finalisers import (
    keep_thread_state_across_collections,
    release_request_objects,
    request_scope,
)
from model_runtime.sandbox.global_state import state_restored
from model_runtime.sandbox.gradients import activations_require_grad, wants_gradients
from model_runtime.sandbox.guards import Guards
from model_runtime.sandbox.integrity import all_healthy as integrity_healthy
from model_runtime.sandbox.integrity import integrity_for
from model_runtime.sandbox.limits import Limits, Worker, address_space_cap, check_payload, tensor_bytes
from model_runtime.sandbox.model_calls import check_attention, check_call_kwargs, install_shape_hook, shape_limits
from model_runtime.sandbox.model_guard import ProcessState, WeightGuard
from model_runtime.sandbox.nnsight_state import RuntimeState
from model_runtime.sandbox.provenance import ServerState
from model_runtime.sandbox.tokenizer_arrays import refuse_foreign_tensor_types
from model_runtime.sandbox.unpickling import loads
from model_runtime.sandbox.work_bounds import request_budget

_ATTN_IMPLEMENTATIONS = frozenset({"eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"})


class RequestFailed(Exception):
    """The user's own code raised; the message carries their traceback, not the server's."""


@dataclass
class ExecutionResult:
    """What one request produced: the result blob the client `finalize()`s, plus metadata."""

    result: bytes
    saved: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class _ModelContext:
    weights: WeightGuard
    caps: Capabilities
    state: ServerState
    runtime: RuntimeState  # nnsight's runtime state made after first serve
    attention: str  # what the replica loaded, which its memory budget is sized for


@dataclass
class _Request:
    ctx: _ModelContext
    guards: Guards
    integrity: Any = None  # the model's WeightIntegrity (its storage is the write guard's)
    restored: list[str] = field(default_factory=list)  # what the request had changed (restored)
    restore_s: float = 0.0


class Sandbox:
    """One per replica: a worker thread, and the protected-weight index of each model."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._worker: Worker | None = None
        self._models: weakref.WeakKeyDictionary[Any, _ModelContext] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()  # nnsight traces are not thread-safe: one at a time
        install_compile_hook()
        refuse_foreign_tensor_types()  # a tokenizer makes no numpy arrays for request code
        keep_thread_state_across_collections()
        prepare_write_guard()  # the dispatcher kernels' registration, before the first request

    @property
    def healthy(self) -> bool:
        """False once a request could not be stopped or changed weights behind the guards' back:
        the runtime should then replace the replica (reloading the weights)."""
        worker_ok = self._worker is None or self._worker.healthy
        return worker_ok and integrity_healthy() and not any(ctx.weights.tainted for ctx in self._models.values())

    def worker(self, seccomp: bool) -> Worker:
        if self._worker is None or not self._worker.healthy:
            self._worker = Worker(seccomp=seccomp)
        return self._worker

    def context(self, model: Any) -> _ModelContext:
        ctx = self._models.get(model)
        if ctx is None or ctx.weights.modules[0] is not model._module:  # new or rebuilt model
            weights = WeightGuard([model._module])
            install_shape_hook(model._module)  # before the snapshot of its hook tables
            state = ServerState(model)
            ctx = _ModelContext(weights, Capabilities(is_protected=weights.is_protected), state,
                                RuntimeState(model, state.adopt),
                                str(getattr(getattr(model._module, "config", None), "_attn_implementation", None)))
            self._models[model] = ctx
        return ctx

    def forget(self, model: Any) -> None:
        """Drop the cached weight index (call after the model's weights were reloaded or moved)."""
        self._models.pop(model, None)

    @contextlib.contextmanager
    def request(self, model: Any, env: dict[str, Any], on_print: Callable[[str], None]) -> Iterator[_Request]:
        """One request's set-up and tear-down around its execution, under the model's lock:
        guards, the weights armed, the env applied; after it, whatever the outcome, the guards
        released and the process state restored (linecache and nnsight's caches are the
        caller's: `model_runtime.replica.execution.nnsight_caches_restored`)."""
        with self._lock:
            ctx = self.context(model)
            request = _Request(ctx, Guards(ctx.caps, ctx.weights.is_protected, on_print=on_print,
                                           server_owned=ctx.state.owns))
            state = ProcessState.capture()
            integrity = request.integrity = integrity_for(model._module)
            integrity.admit()  # refuses while the weights are untrusted (fail closed)
            try:
                if env:
                    check_attention(env.get("attn_implementation"), ctx.attention)
                    model._remoteable_set_env(env)
                ctx.weights.arm(integrity.tensors)
                ctx.state.begin()  # the snapshot taken when first served; again only if stale
                ctx.runtime.begin()  # recorded when first served; read again only if stale
                yield request
            finally:
                t0 = time.perf_counter()
                request.guards.release()
                changed = ctx.state.verify_and_restore() + ctx.runtime.verify_and_restore()
                request.restored = state.restore() + [f"server state {where}" for where in changed]
                request.restore_s = time.perf_counter() - t0
                try:
                    integrity.verify()  # content fingerprint + version counters + identity, every outcome
                finally:
                    if not integrity.untrusted:  # restored: the version backstop's alarm is answered
                        ctx.weights.tainted = False

    def execute(
        self,
        model: Any,
        blob: bytes,
        envelope: Any,
        *,
        limits: Limits | None = None,
        on_log: Callable[[str], None] | None = None,
    ) -> ExecutionResult:
        limits = limits or self.limits
        started = time.perf_counter()
        timings: dict[str, float] = {}
        compress = bool(getattr(envelope, "compress", False))
        raw = check_payload(blob, compress, limits)
        env = _checked_env(getattr(envelope, "env", {}) or {})
        from model_runtime.replica.execution import nnsight_caches_restored

        with self.request(model, env, CappedLog(on_log or (lambda _t: None))) as request, nnsight_caches_restored():
            worker = self.worker(limits.seccomp)
            job = _Job(model, raw, compress, request.guards, request.ctx.weights, limits, timings,
                       request.integrity.storage)
            try:
                with address_space_cap(limits.memory_bytes):
                    result = worker.run(job.run, limits.timeout_s, limits.grace_s)
            finally:
                with contextlib.suppress(Exception):
                    model.interleaver.cancel()
        timings["restore_s"] = request.restore_s
        guards = request.guards
        changed = request.restored
        result.meta.update(
            runtime=time.perf_counter() - started,
            sandbox={
                "seccomp": worker.seccomp_active,
                "restored": changed,
                "timings": timings,
                "guard_calls": vars(guards.counters).copy(),
            },
        )
        return result


def _checked_env(env: Any) -> dict[str, Any]:
    if not isinstance(env, dict):
        raise PayloadRejected("env must be a dict")
    unknown = set(env) - {"attn_implementation"}
    if unknown:
        raise PayloadRejected(f"env keys {sorted(map(str, unknown))} are not supported by this server")
    value = env.get("attn_implementation")
    if value is not None and value not in _ATTN_IMPLEMENTATIONS:
        raise PayloadRejected(f"attn_implementation {value!r} is not supported")
    return dict(env)


@dataclass
class _Job:
    model: Any
    raw: bytes
    compress: bool
    guards: Guards
    weights: WeightGuard
    limits: Limits
    timings: dict[str, float]
    storage: Any  # the server's storages, as the integrity check indexed them (the write guard's)

    def run(self) -> ExecutionResult:
        """Execute and serialise (the standalone executor's job on its worker thread)."""
        saves = self.execute()
        t0 = time.perf_counter()
        result = self._serialize(saves)
        self.timings["serialize_s"] = time.perf_counter() - t0
        return ExecutionResult(result=result, saved=sorted(saves))

    def execute(self) -> dict[str, Any]:
        """Deserialise, compile, run; return the saved values. Runs on the calling thread."""
        sources.begin()
        self.guards.bind_stop()  # this thread's task: its stop is what request code checks
        stop = self.guards.stop
        # Entered here, on the thread running the request: the write guard is a per-thread dispatch
        # mode, and much of the global state is per thread.
        with (
            request_scope(),
            state_restored(),
            sandboxed_compilation(),
            WriteGuard(self.storage),
        ):
            error: BaseException | None = None
            try:
                # While request code runs (not the clean-up below): the stop reaches kernels, and
                # one op may not outlast the point the stop is forced.
                with request_budget(stop):
                    saves = self._run()
            except BaseException as exc:
                error = exc
                raise
            finally:
                # Server clean-up from here: a forced stop waits for it rather than cutting it short.
                stop.shielded = True
                # The request's objects are freed here, under its guards, not on another thread;
                # its code left in them (a generator's cleanup) no longer runs loops or calls.
                self.guards.end()
                release_request_objects(self.model, error)
        self.weights.check()
        if tensor_bytes(saves) > self.limits.max_result_bytes:
            raise LimitExceeded(f"the saved values exceed the {self.limits.max_result_bytes:,}-byte result limit")
        return saves

    def _run(self) -> dict[str, Any]:
        from nnsight.tracing.tracer import _saves, dec, inc

        t0 = time.perf_counter()
        tracer, code = self._deserialize()
        t1 = time.perf_counter()
        self.timings["deserialize_s"] = t1 - t0
        frame = tracer.info.frame
        inc()
        try:
            with activations_require_grad(self.model, wants_gradients(self.raw)), shape_limits(
                self.model._module, self.limits.max_batch_size, self.limits.max_sequence_length
            ):
                tracer.execute(code)
            saves = {k: v for k, v in frame.f_locals.items() if id(v) in _saves()}
        except SandboxError:
            raise
        except Exception as exc:  # the user's error, reported as such
            if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc):
                raise LimitExceeded(
                    f"the request ran out of memory (its allowance is {self.limits.memory_bytes:,} bytes)"
                ) from None
            raise RequestFailed(sources.user_traceback(exc)) from None
        finally:
            dec()
            frame.f_locals.clear()  # the request's variables: freed now, on this thread
        self.timings["execute_s"] = time.perf_counter() - t1
        return saves

    def _deserialize(self) -> tuple[Any, Any]:
        try:
            loaded = loads(self.raw, persistent_objects(self.model), self.guards)
        except SandboxError:
            raise
        except Exception as exc:
            raise PayloadRejected(f"the payload could not be read: {type(exc).__name__}: {exc}") from None
        tracer, source, glbls, lcls = _validate(loaded, self.model)
        frame = tracer.info.frame
        # Compiled and registered under a server-made name, never the client's (sources.py).
        filename = sources.current().register(source, frame.f_code.co_filename)
        frame.f_code.co_filename = filename
        code = restricted_compile(source, filename, _code_name(frame.f_code.co_name))
        namespace = self.guards.namespace()
        glbls.update(namespace)
        lcls["__builtins__"] = namespace["__builtins__"]
        frame.f_globals = glbls
        frame.f_locals = lcls
        tracer.info.code = code
        return tracer, code

    def _serialize(self, saves: dict[str, Any]) -> bytes:
        import torch

        buffer = io.BytesIO()
        try:
            torch.save(saves, buffer, pickle_protocol=4)
        except Exception as exc:
            raise RequestFailed(f"a saved value could not be serialised: {type(exc).__name__}: {exc}") from None
        data = buffer.getvalue()
        if len(data) > self.limits.max_result_bytes:
            raise LimitExceeded(f"the result of {len(data):,} bytes exceeds the {self.limits.max_result_bytes:,} limit")
        if self.compress:
            import zstandard

            data = zstandard.ZstdCompressor(level=3).compress(data)
        return data


def _validate(loaded: Any, model: Any) -> tuple[Any, str, dict[str, Any], dict[str, Any]]:
    """Check the unpickled object is a tracer shaped like a real request, and nothing else."""
    InterleavingTracer, Tracer, SerializedFrame = _request_types()
    if not (isinstance(loaded, tuple) and len(loaded) == 2 and isinstance(loaded[1], tuple)):
        raise PayloadRejected("the payload is not a (tracer, block) pair")
    tracer, block = loaded
    if type(tracer) is not InterleavingTracer and type(tracer) is not Tracer:
        raise PayloadRejected(f"the payload's tracer is a {type(tracer).__name__}, not a known tracer")
    if len(block) != 3:
        raise PayloadRejected("the payload's block is not (source, globals, locals)")
    source, glbls, lcls = block
    if not isinstance(source, str) or not isinstance(glbls, dict) or not isinstance(lcls, dict):
        raise PayloadRejected("the payload's block has the wrong types")
    for names in (glbls, lcls):
        if any(not isinstance(k, str) or k.startswith("_") for k in names):
            raise PayloadRejected("the payload's variables may not have private names")
    info = getattr(tracer, "info", None)
    if info is None or not isinstance(info.frame, SerializedFrame):
        raise PayloadRejected("the payload's tracer has no serialized frame")
    filename = info.frame.f_code.co_filename
    if not isinstance(filename, str) or len(filename) > 4096:
        raise PayloadRejected("the payload's filename is not a reasonable string")
    if isinstance(tracer, InterleavingTracer):
        _validate_call(tracer, model)
    return tracer, source, glbls, lcls


@functools.cache
def _request_types() -> tuple[Any, Any, Any]:
    """nnsight's tracer and frame classes a payload must be made of (imported once)."""
    from nnsight.intervention.tracer import InterleavingTracer
    from nnsight.tracing.tracer import Tracer
    from nnsight.tracing.util import SerializedFrame

    return InterleavingTracer, Tracer, SerializedFrame


@functools.cache
def _model_entry_points() -> frozenset[Any]:
    """nnsight's own model-call entry points (the installed class's: fixed once imported)."""
    from nnsight.modeling.transformers import TransformersModel

    allowed = {TransformersModel._call}
    for name in ("generate", "pipe"):
        wrapped = getattr(getattr(TransformersModel, name), "__wrapped__", None)
        if wrapped is not None:
            allowed.add(wrapped)
    return frozenset(allowed)


def _validate_call(tracer: Any, model: Any) -> None:
    """The model call a trace makes must be one of nnsight's own entry points on its envoy."""
    from nnsight.modeling.transformers import TransformersModel

    fn = tracer.fn
    if not (isinstance(fn, types.MethodType) and fn.__self__ is tracer.envoy and fn.__func__ in _model_entry_points()):
        raise PayloadRejected("the payload asks the server to call something other than the model")
    if not isinstance(tracer.envoy, TransformersModel) or not isinstance(tracer.args, tuple):
        raise PayloadRejected("the payload's model call has the wrong shape")
    if not isinstance(tracer.kwargs, dict) or any(not isinstance(k, str) for k in tracer.kwargs):
        raise PayloadRejected("the payload's model call has the wrong shape")
    check_call_kwargs(tracer.kwargs)
    if tracer.envoy._module is not model._module:
        raise PayloadRejected("the payload's model is not the model this replica serves")


def _code_name(name: object) -> str:
    """The client's name for the traced frame, as a code object's name (shown in tracebacks)."""
    return name if isinstance(name, str) and name.isidentifier() and len(name) <= 100 else "<request>"


def run_blob(model: Any, blob: bytes, envelope: Any) -> dict[str, Any]:
    """Drop-in for `model_runtime.replica.execution.run_blob`: the sandboxed deserialize + execute.

    Runs on the caller's thread, one of the runtime's long-lived request threads: the seccomp
    filter is installed on it at its first request and stays (never on the main thread). The
    runtime keeps its own timeout (async `SystemExit`, which sandboxed code cannot catch), stdout
    capture and result encoding; refusals and user errors become its `RequestError`.
    """
    import sys

    from model_runtime.replica.execution import RequestError

    sandbox = default_sandbox()
    limits = sandbox.limits
    try:
        raw = check_payload(blob, bool(envelope.compress), limits)
        env = _checked_env(dict(envelope.env))
        if limits.seccomp and threading.current_thread() is not threading.main_thread():
            _seccomp_this_thread()
        # linecache and nnsight's caches: execute_request restores them around this call.
        with sandbox.request(model, env, on_print=lambda text: print(text, file=sys.stdout)) as request:
            job = _Job(model, raw, bool(envelope.compress), request.guards, request.ctx.weights, limits, {},
                       request.integrity.storage)
            with address_space_cap(limits.memory_bytes):
                return job.execute()
    except SandboxError as exc:  # its text may quote a library's error, with server paths
        raise RequestError(sources.scrub(str(exc))) from None
    except RequestFailed as exc:  # already the user's frames and a scrubbed message
        raise RequestError(str(exc)) from None


# What the runtime's `select_runner()` picks; it collects on the request thread (finalisers.py).
SANDBOXED = Runner(run_blob, collects_garbage=True)

_SECCOMP = threading.local()


def _seccomp_this_thread() -> None:
    if getattr(_SECCOMP, "installed", False) or not seccomp.supported():
        return
    try:
        seccomp.install_request_filter()
        _SECCOMP.installed = True
    except OSError:
        _SECCOMP.installed = False  # the platform refuses it; the other layers still apply


_DEFAULT: Sandbox | None = None
_DEFAULT_LOCK = threading.Lock()


def execute_sandboxed(
    model: Any,
    blob: bytes,
    envelope: Any,
    *,
    limits: Limits | None = None,
    on_log: Callable[[str], None] | None = None,
) -> ExecutionResult:
    """Run one request blob against `model` inside the sandbox (the process-wide default one)."""
    return default_sandbox().execute(model, blob, envelope, limits=limits, on_log=on_log)


def sandbox_healthy() -> bool:
    """False once the process-wide sandbox saw weights change behind its guards or a request it
    could not stop: the replica must be replaced (for a model app's health check)."""
    return _DEFAULT is None or _DEFAULT.healthy


def configure(limits: Limits) -> None:
    """Set the process-wide sandbox's limits (a model replica: from its ModelDeployment's)."""
    default_sandbox().limits = limits


def default_sandbox() -> Sandbox:
    """The process-wide sandbox (one per replica process)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Sandbox()
        return _DEFAULT

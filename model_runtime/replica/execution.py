"""THE execution seam: the one place where a request blob is deserialized and run.

    execute_request(model, blob, envelope, *, limits, on_log) -> ExecutionResult
    start_request(model, blob, envelope, *, limits, on_log, on_done)  # the same, called back on the loop

`model` is the replica's live nnsight wrapper (e.g. `TransformersModel`), `blob` the bytes the
client POSTed as `blob`, `envelope` the parsed `data` JSON (`Envelope`: model_key, compress, env),
`limits` the per-request caps (`ExecutionLimits`), `on_log(line)` is called (from the worker
thread) for every line the request prints. It never raises for a request's fault: the outcome
(saves blob or an error text for the client) is in the returned `ExecutionResult`.

The sandbox (issue 6) replaces what happens inside the worker thread (deserialize + execute +
collect): `execute_request(..., runner=...)` takes a `Runner` (a function with `run_blob`'s
signature, and whether it collects the request's garbage itself), and `select_runner()` picks the
sandbox's (`model_runtime.sandbox.executor.SANDBOXED`) unless NDIF_SANDBOX=0. Callers (the
model app) never touch nnsight directly.

The recipe is nnsight 0.8.1's:
set env → snapshot linecache + nnsight SOURCES/BLOCKS → `RequestModel.deserialize` with the
model's persistent objects → `inc(); tracer.execute(code)`; keep only the values whose id is in
the thread's save set; `dec()` → restore caches → `interleaver.cancel()`.

Everything from deserialize to collect runs in one request thread (not the caller's), because
nnsight's saved-id set and greenlets are thread-bound; the thread is long-lived and reused
(`model_runtime.replica.request_thread`: no thread start and no seccomp install per request). A timeout
raises `SystemExit` asynchronously in that thread (`PyThreadState_SetAsyncExc`), which stops
Python-level work at the next bytecode, and the thread is then retired; if it is stuck inside one
long C call and does not stop within a grace period, the result says `wedged=True` and the
replica reports itself unhealthy so that Serve replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import linecache
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from model_runtime.bounds import MAX_LOG_BYTES, CappedLog, bounded
from model_runtime.replica.garbage import collect_request_garbage
from model_runtime.replica.persistent_objects import persistent_objects
from model_runtime.replica.request_thread import Outcome, RequestThread, RequestThreadPool
from model_runtime.replica.saving import saved_bytes
from model_runtime.settings import RuntimeSettings

# Level 1, not zstd's default 3: on tensors' bytes (float32/bf16 activations, logits, token ids)
# it compresses as well or better, in 0.5-0.7x the time (docs/runtime.md).
_RESULT_ZSTD_LEVEL = 1


class Envelope(BaseModel):
    """The `data` part of `POST /request` (nnsight's `RequestModel`), minus what we don't trust."""

    model_config = ConfigDict(extra="ignore")

    model_key: str
    session_id: str = ""
    compress: bool = False
    env: dict[str, Any] = {}


@dataclass(frozen=True)
class ExecutionLimits:
    timeout_seconds: float = 300.0
    max_result_bytes: int = 1024**3
    # How long a timed-out worker gets to unwind after the async exception before it counts as wedged.
    cancel_grace_seconds: float = 5.0
    # Everything a request writes to stdout/stderr (prints, warnings) that goes back as LOG lines.
    max_log_bytes: int = MAX_LOG_BYTES


@dataclass
class ExecutionResult:
    """What one request produced. Exactly one of `result` / `error` is set."""

    result: bytes | None = None  # torch.save(saves dict), zstd'd when the request asked for compress
    error: str | None = None  # text shown to the user by `RemoteError`
    meta: dict[str, Any] = field(default_factory=dict)
    timed_out: bool = False
    wedged: bool = False  # the worker thread could not be stopped: replace this replica
    # Epoch seconds of the request's steps in this replica (started on the request thread, ran,
    # encoded, collected): the gateway's request-path breakdown (`GET /timings`), not the client's.
    marks: dict[str, float] = field(default_factory=dict)


class RequestError(Exception):
    """A request's own fault (bad payload, user exception): its message goes to the user."""


# --- stdout/stderr capture ---------------------------------------------------------------------


class _ThreadRoutedStream:
    """Replaces sys.stdout/err: lines written by a registered thread go to its sink, the rest pass.

    sys.stdout is process-global; routing by thread keeps the replica's own logging intact while a
    request prints. Everything else (encoding, fileno, isatty ...) is the original stream's, so
    libraries that inspect the stream (tqdm while loading a model) keep working.
    """

    def __init__(self, fallback: Any) -> None:
        self._fallback = fallback
        self._sinks: dict[int, Callable[[str], None]] = {}
        self._buffers: dict[int, str] = {}

    def route(self, ident: int, sink: Callable[[str], None]) -> None:
        self._sinks[ident] = sink
        self._buffers[ident] = ""

    def unroute(self, ident: int) -> None:
        rest = self._buffers.pop(ident, "")
        sink = self._sinks.pop(ident, None)
        if sink is not None and rest.strip():
            sink(rest.rstrip("\n"))

    def write(self, text: str) -> int:
        ident = threading.get_ident()
        sink = self._sinks.get(ident)
        if sink is None:
            self._fallback.write(text)  # Ray's stream wrappers return None, not a count
            return len(text)
        buffered = self._buffers.get(ident, "") + text
        *lines, rest = buffered.split("\n")
        self._buffers[ident] = rest
        for line in lines:
            if line.strip():
                sink(line)
        return len(text)

    def flush(self) -> None:
        self._fallback.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fallback, name)


_STREAM_LOCK = threading.Lock()


@contextlib.contextmanager
def _capture_output(sink: Callable[[str], None]) -> Iterator[None]:
    with _STREAM_LOCK:
        if not isinstance(sys.stdout, _ThreadRoutedStream):
            sys.stdout = _ThreadRoutedStream(sys.stdout)
        if not isinstance(sys.stderr, _ThreadRoutedStream):
            sys.stderr = _ThreadRoutedStream(sys.stderr)
    ident = threading.get_ident()
    out, err = sys.stdout, sys.stderr
    assert isinstance(out, _ThreadRoutedStream) and isinstance(err, _ThreadRoutedStream)
    out.route(ident, sink)
    err.route(ident, sink)
    try:
        yield
    finally:
        out.unroute(ident)
        err.unroute(ident)


# --- nnsight state snapshots -------------------------------------------------------------------


@contextlib.contextmanager
def nnsight_caches_restored() -> Iterator[None]:
    """Snapshot and restore linecache and nnsight's memoized block sources.

    Without this a later request that reuses a `(filename, line)` trace site would run a stale
    memoized block.
    """
    snapshot = _CachesSnapshot()
    try:
        yield
    finally:
        snapshot.restore()


class _CachesSnapshot:
    """linecache and nnsight's SOURCES/BLOCKS as they were when it was made (`restore` puts them back)."""

    def __init__(self) -> None:
        from nnsight.tracing import globals as nns_globals

        self._globals = nns_globals
        self._lines = dict(linecache.cache)
        self._sources = dict(nns_globals.SOURCES)
        self._blocks = dict(nns_globals.BLOCKS)

    def restore(self) -> None:
        linecache.cache.clear()
        linecache.cache.update(self._lines)
        self._globals.SOURCES.clear()
        self._globals.SOURCES.update(self._sources)
        self._globals.BLOCKS.clear()
        self._globals.BLOCKS.update(self._blocks)


def _user_traceback(exc: BaseException, user_file: str | None) -> str:
    """The traceback a user needs: their own frames, not the server's."""
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if user_file is not None and f.filename == user_file]
    head = "Traceback (most recent call last):\n" + "".join(traceback.format_list(mine)) if mine else ""
    return head + "".join(traceback.format_exception_only(type(exc), exc)).rstrip()


# --- the run ------------------------------------------------------------------------------------


def run_blob(model: Any, blob: bytes, envelope: Envelope) -> dict[str, Any]:
    """Deserialize and execute one request in the calling thread; return the saves dict.

    The sandbox swaps this function. Raises `RequestError` for the request's own faults.
    """
    from nnsight.schema.request import RequestModel
    from nnsight.tracing.tracer import _saves, dec, inc

    try:
        model._remoteable_set_env(envelope.env)
    except Exception as exc:
        raise RequestError(f"Cannot apply the request's model environment {envelope.env!r}: {exc}") from exc
    try:
        tracer = RequestModel.deserialize(
            blob, persistent_objects(model), compress=envelope.compress
        )
    except Exception as exc:
        name = type(exc).__name__
        if "PersistentId" in name:
            raise RequestError(
                f"The request was built for a different model architecture ({name}: {exc}); "
                "check that your transformers/nnsight versions match the server's (/env)."
            ) from exc
        raise RequestError(f"Unreadable request payload ({name}: {exc}).") from exc
    user_file = tracer.info.frame.f_code.co_filename
    inc()
    try:
        try:
            tracer.execute(tracer.info.code)
        except Exception as exc:
            raise RequestError(_user_traceback(exc, user_file)) from exc
        saved_ids = _saves()
        return {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in saved_ids}
    finally:
        dec()


@dataclass(frozen=True, slots=True)
class Runner:
    """How a request's blob is run on its request thread: `run(model, blob, envelope)` returns
    the saves (`run_blob`'s signature). `collects_garbage`: `run` collects the request's garbage
    itself, on the request thread (the sandbox's does, sandbox/finalisers.py), so
    `execute_request` does not collect again."""

    run: Callable[[Any, bytes, Envelope], dict[str, Any]]
    collects_garbage: bool = False


PLAIN = Runner(run_blob)  # no sandbox (NDIF_SANDBOX=0, and the benchmarks' baseline)


def select_runner() -> Runner:
    """The sandbox's runner (the default), or `PLAIN` when NDIF_SANDBOX is 0/false/off."""
    if RuntimeSettings.from_env().sandbox:
        from model_runtime.sandbox.executor import SANDBOXED

        return SANDBOXED
    return PLAIN


def encode_saves(saves: dict[str, Any], compress: bool) -> bytes:
    """`torch.save` the saves (tensors on CPU), zstd'd when the request was compressed."""
    import torch

    def to_cpu(value: Any) -> Any:
        return value.detach().cpu() if isinstance(value, torch.Tensor) else value

    data = torch_saved({k: to_cpu(v) for k, v in saves.items()})
    return _compressor().compress(data) if compress else data


def torch_saved(value: Any) -> bytes:
    """`torch.save` bytes of `value` in torch's non-zip format, which `torch.load` reads as it reads
    the zip one (the client loads results and result frames with plain `torch.load`): no zip
    records to write, and both the save and the client's load are faster for the small results
    most requests return. Pickle protocol 4, as nnsight's own `ResponseModel.pickle()` uses, so
    that bytes values are written as bytes. Written by `model_runtime.replica.saving`: the same
    bytes as `torch.save`, without its per-object Python hook."""
    return saved_bytes(value)


_COMPRESSORS = threading.local()


def _compressor() -> Any:
    """This thread's zstd compressor (one is not safe to share between threads; making one per
    request costs about as much as compressing a small result)."""
    compressor = getattr(_COMPRESSORS, "zstd", None)
    if compressor is None:
        import zstandard

        compressor = _COMPRESSORS.zstd = zstandard.ZstdCompressor(level=_RESULT_ZSTD_LEVEL)
    return compressor


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_PICKLE_PROTO = b"\x80"


def precheck(blob: bytes, envelope: Envelope) -> str | None:
    """A clear refusal for payloads that cannot be a request at all, before any runner sees them.

    Cheap header checks only (zstd frame magic, pickle protocol opcode): whatever runner is in use
    (plain or sandboxed), a wrong compression flag or random bytes get the same plain answer.
    """
    if not blob:
        return "Unreadable request payload: the blob is empty."
    if envelope.compress and not blob.startswith(_ZSTD_MAGIC):
        return "Unreadable request payload: compress=true but the blob is not zstd-compressed."
    if not envelope.compress and not blob.startswith(_PICKLE_PROTO):
        hint = " (it is zstd-compressed)" if blob.startswith(_ZSTD_MAGIC) else ""
        return f"Unreadable request payload: compress=false but the blob is not a pickle{hint}."
    return None


# Requests reuse long-lived threads (one per runner kind, more only while requests overlap):
# see model_runtime/replica/request_thread.py for why and how cancellation works.
_THREADS = RequestThreadPool()


def _peak_rss_bytes() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _gpu_meta() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {}
    peaks = {str(i): int(torch.cuda.max_memory_allocated(i)) for i in range(torch.cuda.device_count())}
    totals = {str(i): torch.cuda.get_device_properties(i).total_memory for i in peaks}
    return {
        "max_mem_by_gpu": peaks,
        "max_mem_pct_by_gpu": {k: 100.0 * v / max(totals[k], 1) for k, v in peaks.items()},
    }


def _reset_gpu_peaks() -> None:
    import torch

    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def execute_request(
    model: Any,
    blob: bytes,
    envelope: Envelope,
    *,
    limits: ExecutionLimits,
    on_log: Callable[[str], None],
    runner: Runner = PLAIN,
    stop: threading.Event | None = None,
) -> ExecutionResult:
    """Run one request to completion, error or timeout. Blocking; callers serialize calls per model.

    `stop`, when set by another thread, stops the request as the timeout does (tensor-parallel
    ranks stop together when rank 0 says so: model_runtime/replica/parallel/stopping.py)."""
    request = _Request.prepared(model, blob, envelope, limits, on_log, runner)
    if isinstance(request, ExecutionResult):
        return request
    with _request_thread(model, runner) as thread:
        ended = thread.run(request.work, limits.timeout_seconds, limits.cancel_grace_seconds, cancel=SystemExit,
                           stop=stop)
    return request.result(ended, thread.forced)


def start_request(
    model: Any,
    blob: bytes,
    envelope: Envelope,
    *,
    limits: ExecutionLimits,
    on_log: Callable[[str], None],
    on_done: Callable[[ExecutionResult], None],
    runner: Runner = PLAIN,
) -> None:
    """`execute_request` for a caller on an event loop (the model replica), called back instead of
    awaited: the request is on its request thread when this returns, and `on_done(result)` is called
    once, on the caller's running loop, when it has ended (the request thread wakes the loop itself:
    no worker thread, task or future in between; a worker thread only stops a request past its
    time). Callers serialize calls per model, as for `execute_request`."""
    loop = asyncio.get_running_loop()
    request = _Request.prepared(model, blob, envelope, limits, on_log, runner)
    if isinstance(request, ExecutionResult):
        loop.call_soon(on_done, request)
        return
    caches = _CachesSnapshot()
    thread = _THREADS.acquire(runner, "nnsight-request")

    def ended(outcome: Outcome) -> None:  # on the loop, once
        try:
            _request_over(model, runner, thread, caches)
            result = request.result(outcome, thread.forced)
        except BaseException as exc:  # the server's fault: the caller still gets its one answer
            result = ExecutionResult(error=bounded(f"Internal error after the request: {type(exc).__name__}: {exc}"))
        on_done(result)

    try:
        thread.launch(request.work, limits.timeout_seconds, limits.cancel_grace_seconds, SystemExit, ended)
    except BaseException:
        _request_over(model, runner, thread, caches)
        raise


@contextlib.contextmanager
def _request_thread(model: Any, runner: Runner) -> Iterator[RequestThread]:
    """A request thread for `runner`, with nnsight's caches restored and the model's interleaver
    cancelled once the request is over."""
    caches = _CachesSnapshot()
    thread = _THREADS.acquire(runner, "nnsight-request")
    try:
        yield thread
    finally:
        _request_over(model, runner, thread, caches)


def _request_over(model: Any, runner: Runner, thread: RequestThread, caches: _CachesSnapshot) -> None:
    """The thread back to the pool, the model's interleaver cancelled, nnsight's caches restored."""
    try:
        _THREADS.release(runner, thread)
        with contextlib.suppress(Exception):
            model.interleaver.cancel()
    finally:
        caches.restore()


class _Request:
    """One request: `work` runs on its request thread; `result` then builds the answer."""

    def __init__(self, model: Any, blob: bytes, envelope: Envelope, limits: ExecutionLimits,
                 on_log: Callable[[str], None], runner: Runner) -> None:
        self.model, self.blob, self.envelope, self.limits = model, blob, envelope, limits
        self.on_log, self.runner = on_log, runner
        self.outcome: dict[str, Any] = {}
        self.marks: dict[str, float] = {}
        self.started = time.monotonic()
        _reset_gpu_peaks()

    @classmethod
    def prepared(cls, model: Any, blob: bytes, envelope: Envelope, limits: ExecutionLimits,
                 on_log: Callable[[str], None], runner: Runner) -> _Request | ExecutionResult:
        """The request, or at once the refusal of a payload that cannot be a request (`precheck`)."""
        refusal = precheck(blob, envelope)
        if refusal is not None:
            return ExecutionResult(error=refusal, meta={"runtime": 0.0})
        return cls(model, blob, envelope, limits, on_log, runner)

    def work(self) -> None:
        marks, outcome = self.marks, self.outcome
        marks["started"] = time.time()
        try:
            with _capture_output(CappedLog(self.on_log, self.limits.max_log_bytes)):
                saves = self.runner.run(self.model, self.blob, self.envelope)
                marks["ran"] = time.time()
                outcome["result"] = encode_saves(saves, self.envelope.compress)
                marks["encoded"] = time.time()
        except RequestError as exc:
            outcome["error"] = bounded(str(exc))
        except SystemExit:
            pass  # the timeout's cancel: no result, reported from `ended` below
        except BaseException as exc:  # the server's fault, but the user still needs an answer
            outcome["error"] = bounded(f"Internal error while running the request: {type(exc).__name__}: {exc}")

    def result(self, ended: Outcome, forced: bool) -> ExecutionResult:
        limits, marks, outcome = self.limits, self.marks, self.outcome
        timed_out = ended is not Outcome.DONE
        wedged = ended is Outcome.WEDGED
        if not self.runner.collects_garbage:
            collect_request_garbage()  # cheap once the replica froze its long-lived objects
        marks["collected"] = time.time()
        meta: dict[str, Any] = {
            "runtime": time.monotonic() - self.started,
            "max_memory_usage": _peak_rss_bytes(),
            **_gpu_meta(),
        }
        if timed_out:
            # How the stop took: at the request code's next check, or only by the asynchronous exception.
            meta["stop"] = "wedged" if wedged else "forced" if forced else "cooperative"
            return ExecutionResult(
                error=f"Job took longer than the timeout of {limits.timeout_seconds:g} seconds and was stopped.",
                meta=meta,
                timed_out=True,
                wedged=wedged,
                marks=marks,
            )
        if "error" in outcome:
            return ExecutionResult(error=outcome["error"], meta=meta, marks=marks)
        result = outcome.get("result")
        if result is None:
            return ExecutionResult(error="The request was cancelled.", meta=meta)
        if len(result) > limits.max_result_bytes:
            return ExecutionResult(
                error=f"Result of {len(result)} bytes exceeds this model's limit of {limits.max_result_bytes} "
                "bytes; save less (slice or reduce tensors before .save()).",
                meta=meta,
            )
        meta["result_bytes"] = len(result)
        return ExecutionResult(result=result, meta=meta, marks=marks)

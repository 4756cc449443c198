"""Layer 5: time, size and memory limits of a request, and the request thread that enforces them.

* **Time**: requests run on one long-lived worker thread (`model_runtime.replica.request_thread`); on
  timeout the supervisor injects `RequestTimeout` (a BaseException user code cannot catch: the
  compiler narrows bare `except:`) with `PyThreadState_SetAsyncExc`, repeatedly until the request
  unwinds, and the thread is retired. A thread stuck inside one C call cannot be interrupted that
  way; after `grace_s` it is abandoned and reported unhealthy (the runtime should restart the
  replica).
* **Sizes**: the payload is capped before and after decompression (a zstd bomb is stopped by a
  bounded streaming decompressor); results are capped by tensor bytes before serialising and by
  serialised size after.
* **Memory**: while a request runs, the process's `RLIMIT_AS` soft limit is lowered to the
  current address-space size plus `memory_bytes`, so an allocation past the cap fails with an
  error instead of taking the node down. Process-wide (it also binds other threads for that
  time) and Linux-only; skipped once CUDA is initialised (the driver grows the address space with
  device allocations); GPU memory is capped by `torch.cuda.set_per_process_memory_fraction`.
* **seccomp**: each request thread installs the request filter (`model_runtime.sandbox.seccomp`,
  `REQUEST_THREAD`) before its first request; the filter is per thread and permanent, which is why
  the threads are dedicated. The whole replica process carries its own filter too
  (`model_runtime.sandbox.process_filter`).
"""

from __future__ import annotations

import os
import resource
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from model_runtime.replica.request_thread import Outcome, RequestThread
from model_runtime.sandbox.errors import LimitExceeded, RequestTimeout
from model_runtime.sandbox.seccomp import install_request_filter
from ndif_operator.api import ModelUserConfig

T = TypeVar("T")
MIB = 1024 * 1024
_DECOMPRESS_CHUNK = MIB


_CONFIG = ModelUserConfig()  # the one set of defaults: the ModelDeployment's (RuntimeLimits)


@dataclass(frozen=True)
class Limits:
    """Per-request limits. A replica builds them from its ModelDeployment's limits
    (`Limits.from_config(ModelUserConfig)`); the defaults are that config's defaults."""

    timeout_s: float = float(_CONFIG.request_timeout_seconds)
    max_payload_bytes: int = _CONFIG.max_payload_bytes
    max_decompressed_bytes: int = 4 * _CONFIG.max_payload_bytes
    max_result_bytes: int = _CONFIG.max_result_bytes
    memory_bytes: int | None = 8 * 1024 * MIB
    seccomp: bool = True
    grace_s: float = 5.0
    max_batch_size: int = _CONFIG.max_batch_size
    max_sequence_length: int = _CONFIG.max_sequence_length

    @classmethod
    def from_config(cls, config: ModelUserConfig) -> Limits:
        return cls(
            timeout_s=float(config.request_timeout_seconds),
            max_payload_bytes=config.max_payload_bytes,
            max_decompressed_bytes=4 * config.max_payload_bytes,
            max_result_bytes=config.max_result_bytes,
            max_batch_size=config.max_batch_size,
            max_sequence_length=config.max_sequence_length,
        )


# --------------------------------------------------------------------------------------------
# Sizes


def check_payload(blob: bytes, compress: bool, limits: Limits) -> bytes:
    """Return the decompressed payload, refusing oversized blobs and decompression bombs."""
    if not isinstance(blob, (bytes, bytearray)):
        raise LimitExceeded("the payload must be bytes")
    if len(blob) > limits.max_payload_bytes:
        raise LimitExceeded(f"payload of {len(blob):,} bytes exceeds the {limits.max_payload_bytes:,} limit")
    if not compress:
        return bytes(blob)
    # Streamed in 1 MiB chunks and stopped at the cap: the frame header's content size is the
    # sender's claim, and one `read(cap)` would allocate the whole cap up front.
    reader = _decompressor().stream_reader(bytes(blob))
    out = bytearray()
    while chunk := reader.read(_DECOMPRESS_CHUNK):
        out += chunk
        if len(out) > limits.max_decompressed_bytes:
            raise LimitExceeded(f"payload decompresses past the {limits.max_decompressed_bytes:,}-byte limit")
    return bytes(out)


_ZSTD = threading.local()


def _decompressor() -> Any:
    """This thread's zstd decompressor: making one costs more than decompressing a typical
    request (each stream starts from a reset context; one per thread, as they are not
    thread-safe)."""
    found = getattr(_ZSTD, "decompressor", None)
    if found is None:
        import zstandard

        found = _ZSTD.decompressor = zstandard.ZstdDecompressor()
    return found


def tensor_bytes(value: Any, _depth: int = 0) -> int:
    """Bytes of tensor data in a (nested) result, counted before serialising it."""
    import torch

    if _depth > 50:
        raise LimitExceeded("the result is nested too deeply")
    if isinstance(value, torch.Tensor):
        return int(value.numel() * value.element_size())
    if isinstance(value, dict):
        return sum(tensor_bytes(v, _depth + 1) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return sum(tensor_bytes(v, _depth + 1) for v in value)
    return 0


# --------------------------------------------------------------------------------------------
# Memory


class address_space_cap:
    """Lower RLIMIT_AS to (current size + `extra`) for the duration; restore it after."""

    def __init__(self, extra: int | None) -> None:
        self.extra = extra
        self.previous: tuple[int, int] | None = None

    def __enter__(self) -> None:
        if self.extra is None or _cuda_initialized():
            # With CUDA up, the driver maps device memory into the address space as it goes, so
            # an address-space cap would refuse legitimate GPU allocations; GPU memory is capped
            # by the CUDA allocator's fraction instead (the model app sets it).
            return
        vm_bytes = _address_space_bytes()
        if vm_bytes is None:
            return  # no procfs (not Linux)
        target = vm_bytes + self.extra
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            target = min(target, hard)
        self.previous = (soft, hard)
        resource.setrlimit(resource.RLIMIT_AS, (target, hard))

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            resource.setrlimit(resource.RLIMIT_AS, self.previous)


_STATM: int | None = None  # the descriptor of /proc/self/statm, opened once per process


def _forget_statm() -> None:
    global _STATM
    _STATM = None  # a forked child must not read its parent's file (it opens its own)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_statm)


def _address_space_bytes() -> int | None:
    """The process's address-space size, from one `pread` of a kept-open /proc/self/statm."""
    global _STATM
    if _STATM is None:
        try:
            _STATM = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
    return int(os.pread(_STATM, 128, 0).split()[0]) * _PAGE_SIZE


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _cuda_initialized() -> bool:
    import sys

    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


# --------------------------------------------------------------------------------------------
# The worker thread and the timeout


class Worker:
    """The sandbox's dedicated request thread, optionally under seccomp (see `RequestThread`)."""

    def __init__(self, *, seccomp: bool) -> None:
        self.seccomp_error: str | None = None
        self.seccomp_active = False
        self._thread = RequestThread("nnsight-sandbox-worker", initializer=self._install if seccomp else None)
        self._thread.start()

    def _install(self) -> None:
        # Runs on every thread the worker starts (a fresh one after a cancelled request).
        try:
            install_request_filter()
            self.seccomp_active = True
        except OSError as exc:
            self.seccomp_error = str(exc)

    @property
    def healthy(self) -> bool:
        return self._thread.healthy

    def run(self, fn: Callable[[], T], timeout_s: float, grace_s: float) -> T:
        """Run `fn` on the worker; raise LimitExceeded if it passes `timeout_s`."""
        box: dict[str, Any] = {}

        def task() -> None:
            try:
                box["result"] = fn()
            except BaseException as exc:
                box["error"] = exc

        outcome = self._thread.run(task, timeout_s, grace_s, cancel=RequestTimeout)
        if outcome is Outcome.WEDGED:
            raise LimitExceeded(
                f"the request ran past {timeout_s:g}s and could not be stopped; this replica must be restarted"
            )
        error = box.get("error")
        if outcome is Outcome.STOPPED or isinstance(error, RequestTimeout):
            raise LimitExceeded(f"the request ran past its {timeout_s:g}s time limit and was stopped")
        if error is not None:
            raise error
        return box["result"]  # type: ignore[no-any-return]

    def stop(self) -> None:
        self._thread.stop()

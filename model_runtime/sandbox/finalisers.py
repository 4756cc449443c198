"""Objects a request made are finalised on its own thread, under its guards; never elsewhere.

A request's objects can run code when they are freed: a suspended generator's `finally` and the
`with` blocks it holds open (user code), and torch's C++ mode guards, whose destructors put back
the thread-local dispatch state they saw when they were made (`torch.inference_mode` restores
the dispatch key sets and autograd state of the request's thread, the write guard's key
included). Freed on another thread (the runtime's caller thread collecting the request's
cycles, or any thread whose allocation triggers a collection), user code would run there
outside the dispatch guard, and the C++ guards would install the request thread's dispatch
state on that thread for good.

So, on the request thread and while the request's guards are still entered,
`release_request_objects` unwinds what nnsight parked, drops the frames an in-flight error
keeps alive, and collects the request's cycles. What is left (objects a long request promoted to
the oldest generation, a teardown cut short by the forced stop) can still be collected on another
thread: `keep_thread_state_across_collections` makes every collection outside a request leave the
collecting thread's dispatch key sets, grad mode and inference mode as it found them. And once
the request has ended, its code raises at its first check (`Guards.end`).
"""

from __future__ import annotations

import contextlib
import gc
import threading
import traceback
from collections.abc import Iterator
from typing import Any

import torch

from model_runtime.replica.garbage import collect_request_garbage
from model_runtime.sandbox import native_guard
from model_runtime.sandbox.global_settings import set_inference_mode

_C: Any = torch._C
_KEYS = tuple(_C.DispatchKey.__members__.values())
_LOCAL = threading.local()  # .requests: guarded scopes open on this thread; .before: a snapshot


@contextlib.contextmanager
def request_scope() -> Iterator[None]:
    """Mark this thread as running a request (its own guards handle its state meanwhile)."""
    _LOCAL.requests = getattr(_LOCAL, "requests", 0) + 1
    try:
        yield
    finally:
        _LOCAL.requests -= 1


def release_request_objects(model: Any, error: BaseException | None) -> None:
    """Free what the request made, here: call on the request thread, inside its guards."""
    with contextlib.suppress(Exception):
        model.interleaver.cancel()  # parked intervention greenlets unwind on the thread they belong to
    seen: set[int] = set()
    while error is not None and id(error) not in seen:  # a traceback keeps the user's frames alive
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__
    collect_request_garbage()


class _ThreadState:
    """The thread-local torch state a finaliser can change: dispatch key sets, grad and inference mode."""

    __slots__ = ("exclude", "grad", "include", "inference", "write_guard")

    def __init__(self) -> None:
        self.include = _C._dispatch_tls_local_include_set()
        self.exclude = _C._dispatch_tls_local_exclude_set()
        self.grad = _C.is_grad_enabled()
        self.inference = _C.is_inference_mode_enabled()
        self.write_guard = _write_guard_active()

    def same(self, other: _ThreadState) -> bool:
        return (self.include.raw_repr() == other.include.raw_repr()
                and self.exclude.raw_repr() == other.exclude.raw_repr()
                and self.grad == other.grad and self.inference == other.inference
                and self.write_guard == other.write_guard)

    def put_back(self) -> None:
        if _C.is_inference_mode_enabled() != self.inference:
            set_inference_mode(self.inference)  # (its guard also sets key sets: those come next)
        for key in _KEYS:
            with contextlib.suppress(Exception):  # aliases that name no single TLS bit
                if _C._dispatch_tls_is_dispatch_key_included(key) != self.include.has(key):
                    _C._dispatch_tls_set_dispatch_key_included(key, self.include.has(key))
                if _C._dispatch_tls_is_dispatch_key_excluded(key) != self.exclude.has(key):
                    _C._dispatch_tls_set_dispatch_key_excluded(key, self.exclude.has(key))
        native = _native()
        if native is not None:
            native.set_active(self.write_guard)  # its key is not in torch's Python enum
        _C._set_grad_enabled(self.grad)


def _native() -> Any:
    return native_guard.loaded()


def _write_guard_active() -> bool:
    native = _native()
    return bool(native is not None and native.is_active())


def _on_collection(phase: str, _info: dict[str, Any]) -> None:
    if getattr(_LOCAL, "requests", 0):
        return  # a request's thread: its own scopes put its state back
    if phase == "start":
        _LOCAL.before = _ThreadState()
        return
    before = getattr(_LOCAL, "before", None)
    _LOCAL.before = None
    if before is not None and not before.same(_ThreadState()):
        before.put_back()


def keep_thread_state_across_collections() -> None:
    """Install the collector callback (once per process)."""
    if _on_collection not in gc.callbacks:
        gc.callbacks.append(_on_collection)

"""Long-lived request threads: run one request at a time off the caller's thread, with a timeout.

    thread = RequestThread("nnsight-request", initializer=install_filter)
    outcome = thread.run(work, timeout_s=300, grace_s=5, cancel=SystemExit)  # DONE / STOPPED / WEDGED
    thread.launch(work, 300, 5, SystemExit, on_end)  # on an event loop: on_end(outcome) there, once

Why a long-lived thread instead of a fresh one per request: starting a thread costs ~0.08 ms
and, when the sandbox is on, installing its per-thread seccomp filter another ~0.18 ms (the
kernel checks and translates the BPF program), both on every request of a ~7 ms tiny-model trace.
A thread keeps its filter, so it is installed once per thread: by the sandbox's runner at the
thread's first request on the runtime's path (`model_runtime.sandbox.executor.run_blob`), or by
`initializer` when the thread starts (the standalone sandbox's `Worker`).

Cancellation, in two steps. First the task's `StopSignal` is set: code that cooperates (the
sandbox's guards, which run at every loop iteration and function entry of request code, and its
stop-aware `time.sleep`) raises `cancel` at its next check, and keeps raising it at every later
check, so catching it does not let request code go on. `current_stop()` is the signal of the task
running on the calling thread. If the work has not ended after half of `grace_s`, `cancel` is also
raised asynchronously in the thread (`PyThreadState_SetAsyncExc`), repeatedly until the work
unwinds or `grace_s` passes: that stops Python code that never checks the signal (the unsandboxed
runner), at whatever bytecode it is running. A thread that was cancelled is then retired and the
next request gets a fresh one: an injected exception still pending could otherwise land between
two requests. A thread that did not stop is WEDGED (stuck in one long C call): it is abandoned and
the caller should have the replica replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


class Outcome(enum.Enum):
    DONE = "done"  # the work returned (or raised: the work handles its own errors)
    STOPPED = "stopped"  # timed out and was cancelled
    WEDGED = "wedged"  # timed out and could not be stopped


class StopSignal:
    """One task's stop request: set by the thread that timed it out, checked by the task's code."""

    __slots__ = ("_also", "_event", "cancel", "forced_at", "shielded", "stopped")

    def __init__(self, cancel: type[BaseException] = SystemExit) -> None:
        self.stopped = False  # a plain attribute: the sandbox reads it at every loop iteration
        self.cancel = cancel
        # Set by server clean-up that must run whole (the sandbox's tear-down): the asynchronous
        # exception is not raised while it is set (a clean-up that never ends is WEDGED).
        self.shielded = False
        self._event = threading.Event()
        self._also: list[Callable[[], None]] = []
        #: When (time.monotonic) the stop is forced if the task has not ended; inf: never.
        self.forced_at = float("inf")

    def set(self) -> None:
        self.stopped = True
        self._event.set()
        for stop in self._also:
            stop()

    def also_stop(self, stop: Callable[[], None]) -> None:
        """Call `stop` too when this signal is set (at once if it already is): a stop that code
        below Python checks (the sandbox's native kernels)."""
        self._also.append(stop)
        if self.stopped:
            stop()

    def check(self) -> None:
        """Raise the task's `cancel` if the task was stopped (every time it is called)."""
        if self.stopped:
            raise self.cancel("the request ran past its time limit and was stopped")

    def sleep(self, seconds: float) -> None:
        """`time.sleep` that ends early, raising `cancel`, when the task is stopped."""
        self._event.wait(max(0.0, seconds))
        self.check()


_NEVER_STOPPED = StopSignal()
_CURRENT = threading.local()


def current_stop() -> StopSignal:
    """The stop signal of the task running on this thread (one that never fires elsewhere)."""
    signal: StopSignal = getattr(_CURRENT, "stop", _NEVER_STOPPED)
    return signal


@dataclass
class _Task:
    fn: Callable[[], None]
    done: threading.Event
    stop: StopSignal
    notify: Callable[[], None] | None = None  # called on the thread once the task has ended


class RequestThread:
    """One daemon thread running tasks in order; replaced transparently after a cancellation."""

    def __init__(self, name: str, initializer: Callable[[], None] | None = None) -> None:
        self.name = name
        self._initializer = initializer
        self._queue: queue.SimpleQueue[_Task | None] | None = None
        self._thread: threading.Thread | None = None
        #: False once a task could not be stopped (its thread is stuck; the process should go).
        self.healthy = True
        #: Whether the last stopped task needed the asynchronous exception (it ignored its signal).
        self.forced = False

    def start(self) -> None:
        """Start the thread now (and run the initializer) instead of on the first task."""
        self._ensure_started()

    def _ensure_started(self) -> tuple[threading.Thread, queue.SimpleQueue[_Task | None]]:
        if self._thread is None or self._queue is None or not self._thread.is_alive():
            tasks: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
            ready = threading.Event()
            thread = threading.Thread(target=self._loop, args=(tasks, ready), name=self.name, daemon=True)
            thread.start()
            ready.wait()
            self._thread, self._queue = thread, tasks
        return self._thread, self._queue

    def _loop(self, tasks: queue.SimpleQueue[_Task | None], ready: threading.Event) -> None:
        try:
            if self._initializer is not None:
                self._initializer()
        finally:
            ready.set()
        while True:
            task = tasks.get()
            if task is None:
                return
            _CURRENT.stop = task.stop
            try:
                task.fn()
            except BaseException:  # the work reports its own errors; this can only be a stray cancel
                pass
            finally:
                _CURRENT.stop = _NEVER_STOPPED
                task.done.set()
                if task.notify is not None:
                    task.notify()

    def run(self, fn: Callable[[], None], timeout_s: float, grace_s: float, cancel: type[BaseException],
            stop: threading.Event | None = None) -> Outcome:
        """Run `fn` on the thread and wait for it; cancel it with `cancel` after `timeout_s`, or as
        soon as `stop` is set (another thread decided the request ends: a tensor-parallel rank 0)."""
        thread, tasks, task = self._submit(fn, timeout_s, grace_s, cancel)
        if _wait_done(task.done, timeout_s, stop):
            return Outcome.DONE
        return self._stop(thread, tasks, task, grace_s)

    def launch(self, fn: Callable[[], None], timeout_s: float, grace_s: float, cancel: type[BaseException],
               on_end: Callable[[Outcome], None]) -> None:
        """`run` for a caller on an event loop, without a coroutine: `fn` is on the thread when this
        returns, and `on_end(outcome)` is called once, on the caller's running loop, when the work
        has ended (the thread itself wakes the loop: one wake-up, no future or task in between) or,
        after `timeout_s`, once a worker thread has stopped it."""
        loop = asyncio.get_running_loop()
        ending = _Ending(on_end)

        def finished() -> None:  # on the loop: the task ended on its own
            if not ending.stopping:
                ending.end(Outcome.DONE)

        def notify() -> None:  # on the request thread, once the task has ended
            with contextlib.suppress(RuntimeError):  # the loop is gone (the replica is shutting down)
                loop.call_soon_threadsafe(finished)

        thread, tasks, task = self._submit(fn, timeout_s, grace_s, cancel, notify)

        def timed_out() -> None:
            if task.done.is_set() or ending.over:
                return  # ended just now: `finished` is on its way to the loop
            ending.stopping = True
            stopping = loop.run_in_executor(None, self._stop, thread, tasks, task, grace_s)
            stopping.add_done_callback(ending.stopped)

        ending.timer = loop.call_later(timeout_s, timed_out)

    def _submit(self, fn: Callable[[], None], timeout_s: float, grace_s: float, cancel: type[BaseException],
                notify: Callable[[], None] | None = None
                ) -> tuple[threading.Thread, queue.SimpleQueue[_Task | None], _Task]:
        thread, tasks = self._ensure_started()
        task = _Task(fn, threading.Event(), StopSignal(cancel), notify)
        task.stop.forced_at = time.monotonic() + timeout_s + grace_s / 2
        tasks.put(task)
        return thread, tasks, task

    def _stop(self, thread: threading.Thread, tasks: queue.SimpleQueue[_Task | None], task: _Task,
              grace_s: float) -> Outcome:
        """Stop a task that ran past its time (blocking, up to `grace_s`)."""
        task.stop.set()  # cooperative first: raised at request code's next check, never in cleanup
        self.forced = not task.done.wait(grace_s / 2)
        deadline = time.monotonic() + grace_s / 2
        while not task.done.is_set() and thread.is_alive() and time.monotonic() < deadline:
            if thread.ident is not None and not task.stop.shielded:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                           ctypes.py_object(task.stop.cancel))
            task.done.wait(0.05)
        tasks.put(None)  # retire it: a fresh thread serves the next task
        self._thread = self._queue = None
        if task.done.is_set() or not thread.is_alive():  # (the cancel may also end the thread's loop)
            return Outcome.STOPPED
        self.healthy = False
        return Outcome.WEDGED

    def stop(self) -> None:
        """Let the thread end after its current task."""
        if self._queue is not None:
            self._queue.put(None)
        self._thread = self._queue = None


class _Ending:
    """How one task started by `RequestThread.launch` ends, on the caller's loop: exactly one call of
    `on_end`, from the thread's own wake-up or from the stop after its timeout."""

    __slots__ = ("on_end", "over", "stopping", "timer")

    def __init__(self, on_end: Callable[[Outcome], None]) -> None:
        self.on_end = on_end
        self.over = False
        self.stopping = False  # timed out: the stop, not the thread's wake-up, ends it
        self.timer: asyncio.TimerHandle | None = None

    def end(self, outcome: Outcome) -> None:
        if self.over:
            return
        self.over = True
        if self.timer is not None:
            self.timer.cancel()
        self.on_end(outcome)

    def stopped(self, stop: asyncio.Future[Outcome]) -> None:
        # A stop that failed leaves the thread in an unknown state: treat it as stuck.
        self.end(Outcome.WEDGED if stop.cancelled() or stop.exception() is not None else stop.result())


def _wait_done(done: threading.Event, timeout_s: float, stop: threading.Event | None) -> bool:
    """Whether `done` was set within `timeout_s` (and before `stop`, when given)."""
    if stop is None:
        return done.wait(timeout_s)
    deadline = time.monotonic() + timeout_s
    while not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return done.is_set()
        if done.wait(min(left, _STOP_POLL_S)):
            return True
    return done.is_set()


_STOP_POLL_S = 0.02  # how soon a stop set by another thread is seen (returns at once when done)


class RequestThreadPool:
    """Idle request threads by kind, so requests reuse a thread and concurrent ones get their own."""

    def __init__(self) -> None:
        self._idle: dict[object, list[RequestThread]] = {}
        self._lock = threading.Lock()

    def acquire(self, kind: object, name: str) -> RequestThread:
        with self._lock:
            idle = self._idle.get(kind)
            if idle:
                return idle.pop()
        return RequestThread(name)

    def release(self, kind: object, thread: RequestThread) -> None:
        if not thread.healthy:
            return  # its thread is stuck: never hand it out again
        with self._lock:
            self._idle.setdefault(kind, []).append(thread)

"""The long-lived request thread: reuse, cancellation, retirement after a cancel, wedging."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from model_runtime.replica.request_thread import Outcome, RequestThread, RequestThreadPool


def _ident_on(thread: RequestThread) -> int:
    seen: list[int] = []
    assert thread.run(lambda: seen.append(threading.get_ident()), 5, 1, cancel=SystemExit) is Outcome.DONE
    return seen[0]


def test_tasks_reuse_one_thread_and_the_initializer_runs_once() -> None:
    starts: list[int] = []
    thread = RequestThread("t", initializer=lambda: starts.append(threading.get_ident()))
    try:
        first, second = _ident_on(thread), _ident_on(thread)
        assert first == second == starts[0] and len(starts) == 1
        assert first != threading.get_ident()
    finally:
        thread.stop()


def test_a_cancelled_task_stops_and_the_next_task_gets_a_fresh_thread() -> None:
    starts: list[int] = []
    thread = RequestThread("t", initializer=lambda: starts.append(threading.get_ident()))
    stopped: list[str] = []

    def spin() -> None:
        try:
            while True:
                pass
        except SystemExit:
            stopped.append("unwound")
            raise

    try:
        before = _ident_on(thread)
        started = time.monotonic()
        assert thread.run(spin, 0.2, 2.0, cancel=SystemExit) is Outcome.STOPPED
        assert time.monotonic() - started < 2 and stopped == ["unwound"]
        after = _ident_on(thread)
        assert after != before and len(starts) == 2  # retired, and the new one initialised too
        assert thread.healthy
    finally:
        thread.stop()


def test_shielded_clean_up_is_not_cut_short_by_the_forced_stop() -> None:
    from model_runtime.replica.request_thread import current_stop

    thread = RequestThread("t")
    finished: list[str] = []

    def clean_up_past_the_timeout() -> None:
        current_stop().shielded = True  # the sandbox's tear-down: Python code that ignores the stop
        end = time.monotonic() + 0.6
        while time.monotonic() < end:
            pass
        finished.append("whole")

    try:
        assert thread.run(clean_up_past_the_timeout, 0.05, 30.0, cancel=SystemExit) is Outcome.STOPPED
        assert finished == ["whole"], "the asynchronous stop interrupted the shielded clean-up"
    finally:
        thread.stop()


def test_a_task_stuck_in_one_c_call_is_wedged() -> None:
    thread = RequestThread("t")
    assert thread.run(lambda: time.sleep(1.5), 0.1, 0.2, cancel=SystemExit) is Outcome.WEDGED
    assert not thread.healthy
    assert _ident_on(thread)  # a fresh thread still serves (the caller decides to restart)
    thread.stop()


def test_pool_reuses_idle_threads_and_drops_wedged_ones() -> None:
    pool = RequestThreadPool()
    a = pool.acquire("kind", "t")
    b = pool.acquire("kind", "t")  # a and b overlap: two threads
    assert a is not b
    pool.release("kind", a)
    assert pool.acquire("kind", "t") is a
    pool.release("kind", a)
    assert pool.acquire("other", "t") is not a  # kinds do not share threads
    assert pool.acquire("kind", "t") is a
    a.healthy = False
    pool.release("kind", a)
    assert pool.acquire("kind", "t") is not a
    for thread in (a, b):
        thread.stop()


def test_a_stop_set_by_another_thread_cancels_before_the_timeout() -> None:
    """A tensor-parallel rank 0 decides when every rank's request ends (parallel/stopping.py)."""
    thread = RequestThread("t")
    stop = threading.Event()

    def spin() -> None:
        while True:
            pass

    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    try:
        assert thread.run(spin, 60, 5, cancel=SystemExit, stop=stop) is Outcome.STOPPED
        assert time.monotonic() - started < 10
        done = threading.Event()
        assert thread.run(done.set, 5, 1, cancel=SystemExit, stop=threading.Event()) is Outcome.DONE
        assert done.is_set()
    finally:
        thread.stop()


async def _launched(thread: RequestThread, fn: Any, timeout_s: float, grace_s: float) -> Outcome:
    """`RequestThread.launch` (the replica's call), awaited: its `on_end` resolves a future on this loop."""
    ended: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
    thread.launch(fn, timeout_s, grace_s, SystemExit, ended.set_result)
    return await ended


def test_an_event_loop_awaits_the_thread_directly() -> None:
    """`launch`: the work runs on the request thread and wakes the loop; past its time it is
    stopped as `run` stops it, and the next task gets a fresh thread."""
    starts: list[int] = []
    thread = RequestThread("t", initializer=lambda: starts.append(threading.get_ident()))

    def spin() -> None:
        while True:
            pass

    async def main() -> tuple[Outcome, Outcome, Outcome]:
        seen: list[int] = []
        done = await _launched(thread, lambda: seen.append(threading.get_ident()), 5, 1)
        assert seen == starts[:1] and seen[0] != threading.get_ident()
        started = time.monotonic()
        stopped = await _launched(thread, spin, 0.2, 2.0)
        assert time.monotonic() - started < 2
        again = await _launched(thread, lambda: None, 5, 1)
        assert len(starts) == 2  # the stopped thread was retired; a fresh one ran the next task
        return done, stopped, again

    try:
        assert asyncio.run(main()) == (Outcome.DONE, Outcome.STOPPED, Outcome.DONE)
        assert thread.healthy
    finally:
        thread.stop()


def test_launch_calls_back_once_on_the_loop() -> None:
    """`launch`: the task is on the thread when it returns; `on_end` is called exactly once, on the
    caller's loop thread, with DONE, or with STOPPED / WEDGED after the timeout (also when the task
    ends during its stop, or the stop itself fails)."""
    thread = RequestThread("t")
    ends: list[tuple[Outcome, int]] = []

    def spin() -> None:
        while True:
            pass

    async def ended_after(fn: Any, timeout_s: float, grace_s: float = 1.0) -> None:
        loop_thread = threading.get_ident()
        over = asyncio.Event()

        def on_end(outcome: Outcome) -> None:
            ends.append((outcome, threading.get_ident()))
            assert threading.get_ident() == loop_thread
            over.set()

        thread.launch(fn, timeout_s, grace_s, SystemExit, on_end)
        await over.wait()
        await asyncio.sleep(timeout_s + 0.1)  # no second call: not from the timer, not from the thread

    def ends_late() -> None:  # one C call that returns on its own during its stop
        time.sleep(0.3)

    async def main() -> None:
        await ended_after(lambda: None, 0.2)
        await ended_after(spin, 0.2)
        await ended_after(ends_late, 0.1)

    try:
        asyncio.run(main())
        assert [outcome for outcome, _ in ends] == [Outcome.DONE, Outcome.STOPPED, Outcome.STOPPED]
        assert thread.healthy
    finally:
        thread.stop()


def test_a_failed_stop_counts_as_wedged(monkeypatch: pytest.MonkeyPatch) -> None:
    thread = RequestThread("t")

    def broken_stop(*_args: Any) -> Outcome:
        raise RuntimeError("the stop broke")

    monkeypatch.setattr(thread, "_stop", broken_stop)
    release = threading.Event()

    async def main() -> Outcome:
        ended: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        thread.launch(lambda: release.wait(5), 0.1, 1.0, SystemExit, ended.set_result)
        return await ended

    try:
        assert asyncio.run(main()) is Outcome.WEDGED
    finally:
        release.set()
        thread.stop()

"""The planner loop: one timer per purpose, retries with backoff, one log line per outage state."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ndif_operator.operator.kube import UNREACHABLE, KubeError
from ndif_operator.operator.loop import PassOutcome, PlannerLoop, Timers, Wake
from ndif_operator.operator.settings import OperatorSettings


def _settings(**overrides: object) -> OperatorSettings:
    values = {"debounce_seconds": 0.0, "resync_seconds": 3600.0, "backoff_initial_seconds": 0.01,
              "backoff_max_seconds": 0.04, **overrides}
    return OperatorSettings(**values)  # type: ignore[arg-type]


async def test_arming_a_purpose_again_replaces_its_timer() -> None:
    woken: list[int] = []
    timers = Timers(lambda: woken.append(1))
    for _ in range(20):
        timers.arm(Wake.JOB_POLL, 0.01)
    timers.arm(Wake.DEMAND_POLL, 10.0)
    assert set(timers.armed) == {Wake.JOB_POLL, Wake.DEMAND_POLL}
    await asyncio.sleep(0.05)
    assert woken == [1]  # twenty arms, one wake-up
    timers.cancel_all()
    assert timers.armed == {}


async def test_a_check_wakes_only_on_change_and_keeps_polling_otherwise() -> None:
    woken: list[int] = []
    answers = [False, False, True]
    timers = Timers(lambda: woken.append(1))

    async def check() -> bool:
        return answers.pop(0)

    timers.set_check(Wake.DEMAND_POLL, check)
    timers.arm(Wake.DEMAND_POLL, 0.01)
    for _ in range(100):
        if woken:
            break
        await asyncio.sleep(0.01)
    assert woken == [1] and answers == []
    assert Wake.DEMAND_POLL not in timers.armed  # a change hands over to a pass, which re-arms if needed


async def test_each_pass_sets_exactly_the_timers_it_wants() -> None:
    wanted = [{Wake.JOB_POLL: 30.0, Wake.ACTIVATION_EXPIRY: 40.0}, {Wake.JOB_POLL: 30.0}, {}]
    loop = PlannerLoop(_settings(), lambda: _outcome(timers=wanted.pop(0)))
    for expected in ({Wake.JOB_POLL, Wake.ACTIVATION_EXPIRY}, {Wake.JOB_POLL}, set()):
        outcome = await loop.run_once()
        loop._set_timers(outcome)
        assert set(loop.timers.armed) == expected
    assert loop.passes == 3


async def _outcome(**fields: object) -> PassOutcome:
    return PassOutcome(**fields)  # type: ignore[arg-type]


async def test_an_outage_arms_only_the_retry_timer_and_logs_once_per_state(caplog: pytest.LogCaptureFixture) -> None:
    results: list[PassOutcome | Exception] = [
        PassOutcome(timers={Wake.JOB_POLL: 30.0}),
        *[KubeError(UNREACHABLE, "ClientConnectorError: connection refused")] * 5,
        KubeError(503, "etcdserver: leader changed", "ServiceUnavailable"),
        PassOutcome(),
    ]
    done = asyncio.Event()

    async def run_pass() -> PassOutcome:
        result = results.pop(0)
        if not results:
            done.set()
        if isinstance(result, Exception):
            raise result
        return result

    loop = PlannerLoop(_settings(), run_pass)
    seen: list[set[Wake]] = []
    original = loop._set_timers

    def record(outcome: PassOutcome) -> None:
        original(outcome)
        seen.append(set(loop.timers.armed))

    loop._set_timers = record  # type: ignore[method-assign]
    caplog.set_level(logging.DEBUG, logger="ndif_operator.loop")
    task = asyncio.create_task(loop.run())
    loop.wake()
    while not seen:
        await asyncio.sleep(0.01)
    loop.wake()  # a watch event; from here on only the retry timer drives the passes
    await asyncio.wait_for(done.wait(), 10)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen[0] == {Wake.JOB_POLL}
    assert all(armed == {Wake.RETRY} for armed in seen[1:7])  # the poll timer is gone during the outage
    assert seen[7] == set()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 3, warnings  # outage starts, changes, ends: not one line per pass
    assert "API server unreachable" in warnings[0] and "leader changed" in warnings[1]
    assert "complete again after 6 incomplete passes" in warnings[2]
    assert not any(r.exc_info for r in caplog.records)


async def test_a_conflict_retries_at_once() -> None:
    loop = PlannerLoop(_settings(backoff_initial_seconds=5.0), lambda: _raise(KubeError(409, "modified", "Conflict")))
    outcome = await loop.run_once()
    assert outcome.retry and outcome.conflict


async def _raise(exc: Exception) -> PassOutcome:
    raise exc


async def test_a_bug_logs_its_traceback_once(caplog: pytest.LogCaptureFixture) -> None:
    loop = PlannerLoop(_settings(), lambda: _raise(RuntimeError("boom")))
    for _ in range(3):
        outcome = await loop.run_once()
        loop._report_trouble(outcome, 0.1)
    assert len([r for r in caplog.records if r.exc_info]) == 1


def test_kopf_handlers_run_on_the_event_loop() -> None:
    """Every handler is `async def`: Kopf runs sync ones in a worker thread, and the planner's
    wake-up Event must only be set from the loop's own thread."""
    import inspect

    from ndif_operator.operator.handlers import build_registry
    from ndif_operator.operator.login import Login

    settings = _settings(kube_api_url="https://127.0.0.1:1")
    registry = build_registry(settings, Login(settings, environ={}))
    handlers = [h for part in (registry._activities, registry._watching)
                for h in part.get_all_handlers()]
    assert len(handlers) >= 5
    assert all(inspect.iscoroutinefunction(h.fn) for h in handlers), [h.id for h in handlers]

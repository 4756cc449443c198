"""The planner's loop: when to run a pass, and nothing else.

A pass runs after a wake-up (a watch event, via the Kopf handlers) once events pause for
`debounce_seconds` (at most 8x that), so a burst of 200 applies becomes a handful of passes; and at
least every `resync_seconds` (level-triggered: a lost event costs latency, never correctness).

Every other reason to run again is a timer with a purpose (`Wake`), and there is at most one timer
per purpose: each pass says which timers it wants (`PassOutcome.timers`) and the loop arms those,
replacing any earlier timer of the same purpose, and cancels the rest. A failed pass arms only the
retry timer (capped exponential backoff; a 409 retries at once). A purpose may have a `check`: a
cheap probe run when its timer fires (e.g. the gateway's demand) that wakes the planner only when
it reports a change, and otherwise re-arms itself; idle polling then costs no API reads.

An outage logs one line when the trouble starts or changes and one when it ends, not one per pass.
All of this runs on the event loop's thread: `wake()` must be called from it (Kopf's handlers are
`async def` for that reason).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum

from ndif_operator.operator import health, metrics
from ndif_operator.operator.kube import KubeError
from ndif_operator.operator.settings import OperatorSettings

logger = logging.getLogger("ndif_operator.loop")


class Wake(StrEnum):
    """Why the planner should run again without a watch event."""

    RETRY = "retry"  # the last pass was incomplete
    JOB_POLL = "job-poll"  # a meta-device evaluator Job runs (Jobs are not watched)
    ESTIMATE_RETRY = "estimate-retry"  # a failed estimate's backoff ends
    ACTIVATION_EXPIRY = "activation-expiry"  # an activateOnRequest window ends
    DEMAND_POLL = "demand-poll"  # the gateway may report demand for a Warm activateOnRequest model
    CALENDAR_POLL = "calendar-poll"  # a CalendarSchedule's calendar is due to be read
    BOOKING_EDGE = "booking-edge"  # a calendar booking starts or ends
    GPU_WAIT = "gpu-wait"  # a Hot model's application deploys: its replica may wait for a GPU share


@dataclass
class PassOutcome:
    retry: bool = False
    errors: list[str] = field(default_factory=list)
    conflict: bool = False  # a 409: re-read and go again at once
    timers: dict[Wake, float] = field(default_factory=dict)  # delay per wanted timer; absent: cancelled

    def want(self, purpose: Wake, delay: float) -> None:
        """Keep the earliest delay asked for `purpose` in this pass."""
        self.timers[purpose] = min(delay, self.timers.get(purpose, delay))


Check = Callable[[], Awaitable[bool]]


class Timers:
    """One pending timer per purpose; arming a purpose again replaces its timer."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._handles: dict[Wake, asyncio.TimerHandle] = {}
        self._checks: dict[Wake, Check] = {}
        self._running: set[asyncio.Task[None]] = set()

    def set_check(self, purpose: Wake, check: Check) -> None:
        self._checks[purpose] = check

    @property
    def armed(self) -> dict[Wake, float]:
        """Purpose → when it fires (loop time)."""
        return {purpose: handle.when() for purpose, handle in self._handles.items()}

    def arm(self, purpose: Wake, delay: float) -> None:
        self.cancel(purpose)
        loop = asyncio.get_running_loop()
        self._handles[purpose] = loop.call_later(max(delay, 0.0), self._fire, purpose, delay)

    def cancel(self, purpose: Wake) -> None:
        handle = self._handles.pop(purpose, None)
        if handle is not None:
            handle.cancel()

    def cancel_all(self) -> None:
        for purpose in list(self._handles):
            self.cancel(purpose)
        for task in list(self._running):
            task.cancel()

    def _fire(self, purpose: Wake, delay: float) -> None:
        self._handles.pop(purpose, None)
        check = self._checks.get(purpose)
        if check is None:
            self._wake()
            return
        task = asyncio.get_running_loop().create_task(self._probe(purpose, check, delay))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _probe(self, purpose: Wake, check: Check, delay: float) -> None:
        try:
            changed = await check()
        except Exception:
            logger.exception("the %s check failed", purpose)
            changed = True  # let a full pass find out
        if changed:
            self._wake()
        elif purpose not in self._handles:
            self.arm(purpose, delay)  # nothing new: keep polling on the same period


Pass = Callable[[], Awaitable[PassOutcome]]


class PlannerLoop:
    def __init__(self, settings: OperatorSettings, run_pass: Pass) -> None:
        self.settings = settings
        self._run_pass = run_pass
        self._wake = asyncio.Event()
        self.timers = Timers(self.wake)
        self.passes = 0
        self._trouble: str | None = None  # what the last incomplete pass logged (None: all well)
        self._incomplete = 0

    def wake(self) -> None:
        self._wake.set()

    async def _quiet(self) -> None:
        """Wait for a wake-up (or the resync), then until events pause for `debounce_seconds`."""
        try:
            await asyncio.wait_for(self._wake.wait(), self.settings.resync_seconds)
        except TimeoutError:
            pass
        debounce = self.settings.debounce_seconds
        waited = 0.0
        while debounce > 0:
            self._wake.clear()
            await asyncio.sleep(debounce)
            waited += debounce
            if not self._wake.is_set() or waited >= 8 * debounce:
                break
        self._wake.clear()

    async def run(self) -> None:
        """Plan forever (until cancelled). Never raises on API trouble: it backs off and retries."""
        backoff = self.settings.backoff_initial_seconds
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._quiet()
                started = loop.time()
                outcome = await self.run_once()
                metrics.RECONCILE_SECONDS.observe(loop.time() - started)
                metrics.RECONCILES.labels("retry" if outcome.retry else "ok").inc()
                health.STATE.pass_finished(ok=not outcome.retry, error="; ".join(outcome.errors))
                if outcome.retry:
                    delay = min(backoff, 0.05) if outcome.conflict else backoff
                    self._report_trouble(outcome, delay)
                    outcome.timers[Wake.RETRY] = delay
                    backoff = min(max(backoff, self.settings.backoff_initial_seconds) * 2,
                                  self.settings.backoff_max_seconds)
                else:
                    self._report_recovery()
                    backoff = self.settings.backoff_initial_seconds
                self._set_timers(outcome)
        finally:
            self.timers.cancel_all()

    async def run_once(self) -> PassOutcome:
        """One pass; API errors and bugs become an incomplete outcome (retried), never an exception."""
        self.passes += 1
        try:
            return await self._run_pass()
        except KubeError as exc:
            return PassOutcome(retry=True, errors=[str(exc)], conflict=exc.status == 409)
        except Exception as exc:
            trouble = f"unexpected error: {type(exc).__name__}: {exc}"
            if trouble != self._trouble:
                logger.exception("planner pass failed")  # a bug: the traceback once, not every pass
            return PassOutcome(retry=True, errors=[trouble])

    def _set_timers(self, outcome: PassOutcome) -> None:
        for purpose in Wake:
            if purpose in outcome.timers:
                self.timers.arm(purpose, outcome.timers[purpose])
            else:
                self.timers.cancel(purpose)

    def _report_trouble(self, outcome: PassOutcome, delay: float) -> None:
        self._incomplete += 1
        trouble = "; ".join(outcome.errors) or "incomplete"
        if outcome.conflict:
            logger.debug("planner pass hit a conflict (%s); re-reading at once", trouble)
            return
        if trouble != self._trouble:
            logger.warning("planner pass incomplete (%s); retrying with backoff (now %.2fs, at most %.0fs); "
                           "repeats of this are not logged", trouble, delay, self.settings.backoff_max_seconds)
            self._trouble = trouble
        else:
            logger.debug("planner pass still incomplete (%s); retrying in %.2fs", trouble, delay)

    def _report_recovery(self) -> None:
        if self._trouble is not None:
            logger.warning("planner pass complete again after %d incomplete passes", self._incomplete)
        self._trouble = None
        self._incomplete = 0

"""activateOnRequest in the operator: the gateway's demand → each Warm model's Hot window.

In a pass, `apply` reads the gateway's demand for one RayService, sets each candidate's window
(planning.activation decides) and posts Events when a model becomes Hot on request or goes back
to Warm. Between passes, `watch` long-polls each planned RayService's gateway (`GET /demand`),
which answers the moment a Warm model is requested: the planner wakes at once when some window
would change, with no polling interval and no Kubernetes API requests. The `Wake.DEMAND_POLL`
timer (`check`, reading `/status`) stays as the fallback for a gateway that cannot be long-polled.
A `Wake.ACTIVATION_EXPIRY` timer ends a window on time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from ndif_operator.api import Level
from ndif_operator.operator.entries import Entry, parse_time
from ndif_operator.operator.gateway_status import GatewayStatus
from ndif_operator.operator.loop import PassOutcome, Wake
from ndif_operator.operator.recorder import EventRecorder
from ndif_operator.operator.settings import OperatorSettings
from ndif_operator.planning.activation import Demand, activation_until, is_active

Target = tuple[str, str]


@dataclass(frozen=True, slots=True)
class _Candidate:
    key: str
    minimum_deployment_seconds: int
    until: datetime | None  # the window the last pass set


class Activations:
    def __init__(self, settings: OperatorSettings, gateway: GatewayStatus, recorder: EventRecorder,
                 clock: Callable[[], datetime]) -> None:
        self.settings = settings
        self.gateway = gateway
        self.recorder = recorder
        self.clock = clock
        self._candidates: dict[Target, list[_Candidate]] = {}

    def forget(self, keep: set[Target]) -> None:
        """Drop what is remembered about RayServices no longer planned for."""
        for target in set(self._candidates) - keep:
            del self._candidates[target]

    def _until(self, demand: Demand | None, current: datetime | None, minimum: int, now: datetime) -> datetime | None:
        return activation_until(activate_on_request=True, spec_level=Level.WARM, demand=demand, current_until=current,
                                now=now, minimum_deployment_seconds=minimum,
                                ttl_seconds=self.settings.activation_ttl_seconds)

    async def apply(self, target: Target, live: list[Entry], now: datetime, outcome: PassOutcome) -> None:
        candidates = [e for e in live if e.md is not None and e.md.spec.activate_on_request
                      and Level(e.md.spec.level) == Level.WARM]
        if not candidates:
            self._candidates.pop(target, None)
            return  # a policy or level change ends any activation: status drops activatedUntil
        demands = await self.gateway.demands(*target)
        remembered: list[_Candidate] = []
        for entry in candidates:
            assert entry.md is not None
            previous = parse_time(entry.status.get("activatedUntil"))
            minimum = entry.md.spec.minimum_deployment_seconds
            until = self._until(demands.get(entry.key), previous, minimum, now)
            entry.activated_until = until
            entry.activated = is_active(until, now)
            remembered.append(_Candidate(entry.key, minimum, until))
            if entry.activated and until != previous:
                await self.recorder.post(entry.obj, "ActivatedOnRequest", f"requested while Warm: Hot until "
                                         f"{until.isoformat() if until else ''} (activateOnRequest)", warning=False)
            elif not entry.activated and previous is not None and entry.status.get("level") == Level.HOT.value:
                await self.recorder.post(entry.obj, "ActivationExpired", "no longer Hot on request: back to Warm",
                                         warning=False)
            if entry.activated and until is not None:
                outcome.want(Wake.ACTIVATION_EXPIRY, max((until - now).total_seconds(), 0.0) + 0.05)
        self._candidates[target] = remembered
        outcome.want(Wake.DEMAND_POLL, self.settings.activation_poll_seconds)

    async def check(self) -> bool:
        """Between passes: True when the gateway's demand would change some model's window."""
        for target in list(self._candidates):
            if self._would_change(target, await self.gateway.demands(*target)):
                return True
        return False

    def _would_change(self, target: Target, demands: dict[str, Demand]) -> bool:
        now = self.clock()
        for candidate in self._candidates.get(target, []):
            demand = demands.get(candidate.key)
            if demand is None:
                continue
            if self._until(demand, candidate.until, candidate.minimum_deployment_seconds, now) != candidate.until:
                return True
        return False

    async def watch(self, wake: Callable[[], None], *, rescan_s: float = 1.0) -> None:
        """Forever: one long-poll of `/demand` per RayService with activateOnRequest candidates;
        `wake()` as soon as a pushed demand would change a window."""
        tasks: dict[Target, asyncio.Task[None]] = {}
        try:
            while True:
                wanted = set(self._candidates)
                for target in set(tasks) - wanted:
                    tasks.pop(target).cancel()
                for target in wanted - set(tasks):
                    tasks[target] = asyncio.create_task(self._watch_one(target, wake), name=f"ndif-demand-{target}")
                await asyncio.sleep(rescan_s)
        finally:
            for task in tasks.values():
                task.cancel()
            for task in tasks.values():
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _watch_one(self, target: Target, wake: Callable[[], None]) -> None:
        seq, backoff = -1, 1.0
        while True:
            answer = await self.gateway.wait_demand(*target, since=seq)
            if answer is None:  # not reachable (or an older gateway): the DEMAND_POLL timer covers it
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            new_seq, demands = answer
            if new_seq > seq:
                seq = new_seq
                if self._would_change(target, demands):
                    wake()

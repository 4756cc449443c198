"""Activation demand for the operator: WARM models whose policy is `activateOnRequest` were asked for.

A model app's refusal of a request to a WARM model says `activation_requested`; the gateway notes
the model here. `/status` shows each note, and `GET /demand` long-polls on a counter bumped per
note, so the operator (and local mode) hear of a demand at once instead of polling.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from ndif_operator.api import GatewayRoute

DEMAND_WAIT_MAX_S = 60.0  # the longest `GET /demand` holds a long-poll


class Demand:
    def __init__(self) -> None:
        self.requested: dict[str, float] = {}  # model key → epoch seconds of its latest activation request
        self.seq = 0  # bumped per recorded demand; `GET /demand` long-polls on it
        self._waiters: set[asyncio.Future[None]] = set()

    def note(self, key: str) -> None:
        """Record a WARM model's activation request and wake the `GET /demand` long-polls at once."""
        self.requested[key] = time.time()
        self.seq += 1
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, since: int, timeout: float) -> None:
        """Returns once a demand newer than `since` is recorded, or after `timeout` seconds (at most 60)."""
        if self.seq > since:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter, min(max(timeout, 0.0), DEMAND_WAIT_MAX_S))
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(waiter)

    def answer(self, routes: Mapping[str, GatewayRoute]) -> dict[str, Any]:
        """`GET /demand`'s body: `/status`'s shape for the requested models, plus `seq`."""
        deployments = {
            key: {"deployment": route.deployment, "activation_requested": True,
                  "activation_requested_at": self.requested[key], "granted_level": str(route.level).upper()}
            for key, route in sorted(routes.items()) if key in self.requested
        }
        return {"seq": self.seq, "deployments": deployments}

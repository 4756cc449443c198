"""The operator hears of activation demand at once: each gateway's `/demand` long-poll wakes the planner."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from ndif_operator.operator.activation import Activations, _Candidate
from ndif_operator.operator.gateway_status import GatewayStatus
from ndif_operator.operator.settings import OperatorSettings
from ndif_operator.planning.activation import Demand

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class ScriptedGateway(GatewayStatus):
    """`wait_demand` answers from a queue, as the gateway would when demands are recorded."""

    def __init__(self) -> None:
        super().__init__("http://{name}.{namespace}:8000")
        self.answers: asyncio.Queue[tuple[int, dict[str, Demand]] | None] = asyncio.Queue()
        self.calls: list[tuple[str, str, int]] = []

    async def wait_demand(self, namespace: str, ray_service: str, since: int,
                          timeout_s: float = 30.0) -> tuple[int, dict[str, Demand]] | None:
        self.calls.append((namespace, ray_service, since))
        return await self.answers.get()


def _activations(gateway: GatewayStatus) -> Activations:
    return Activations(OperatorSettings(), gateway, recorder=None, clock=lambda: NOW)  # type: ignore[arg-type]


def test_a_pushed_demand_wakes_the_planner_once_it_would_change_a_window() -> None:
    async def scenario() -> tuple[int, list[tuple[str, str, int]]]:
        gateway = ScriptedGateway()
        activations = _activations(gateway)
        activations._candidates[("ns", "rs")] = [_Candidate("ns/warm", 0, None)]
        woken = asyncio.Event()
        wakes = 0

        def wake() -> None:
            nonlocal wakes
            wakes += 1
            woken.set()

        watcher = asyncio.create_task(activations.watch(wake, rescan_s=0.01))
        await gateway.answers.put((0, {}))  # the first answer: where the counter is, no demand
        await gateway.answers.put((1, {"ns/other": Demand(requested=True, at=NOW)}))  # not a candidate
        await gateway.answers.put((2, {"ns/warm": Demand(requested=True, at=NOW)}))
        await asyncio.wait_for(woken.wait(), 5)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        return wakes, gateway.calls

    wakes, calls = asyncio.run(scenario())
    assert wakes == 1
    assert [since for _, _, since in calls][:3] == [-1, 0, 1]  # each poll asks for what is newer
    assert calls[0][:2] == ("ns", "rs")


def test_wait_demand_reads_the_gateway_long_poll_over_http() -> None:
    async def scenario() -> tuple[Any, Any, list[str]]:
        seen: list[str] = []

        async def demand(request: web.Request) -> web.Response:
            seen.append(f"{request.query['since']}|{request.headers.get('ndif-api-key')}")
            return web.json_response({"seq": 3, "deployments": {"m": {
                "deployment": "ns/warm", "activation_requested": True, "activation_requested_at": 1.0e9}}})

        app = web.Application()
        app.router.add_get("/demand", demand)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            gateway = GatewayStatus(f"http://127.0.0.1:{port}", "key")
            answer = await gateway.wait_demand("ns", "rs", since=2, timeout_s=1)
            missing = await GatewayStatus("http://127.0.0.1:9").wait_demand("ns", "rs", since=0, timeout_s=1)
        finally:
            await runner.cleanup()
        return answer, missing, seen

    answer, missing, seen = asyncio.run(scenario())
    assert answer is not None and answer[0] == 3 and answer[1]["ns/warm"].requested
    assert missing is None
    assert seen == ["2|key"]

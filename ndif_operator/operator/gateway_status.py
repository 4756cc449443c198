"""The gateway's `GET /status`, read by the operator for activation on request and for the HOT
replicas that wait for a GPU share another model still holds.

Best effort: a gateway that is down, slow or answers garbage means "no demand seen" (a Warm model
stays Warm), never a failed pass. One short-lived aiohttp session per call keeps no sockets open
between passes (they are seconds apart).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import aiohttp

from ndif_operator.api.naming import API_KEY_HEADER
from ndif_operator.planning.activation import Demand, demands_from_gateway_status

logger = logging.getLogger("ndif_operator.gateway_status")


def gpu_waits_from_gateway_status(body: Mapping[str, Any]) -> dict[str, str]:
    """`namespace/name` → the gateway's sentence about its replica's GPU wait (bad entries skipped)."""
    deployments = body.get("deployments")
    if not isinstance(deployments, Mapping):
        return {}
    waits: dict[str, str] = {}
    for info in deployments.values():
        if not isinstance(info, Mapping) or not isinstance(info.get("deployment"), str):
            continue
        wait = info.get("gpu_wait")
        if isinstance(wait, Mapping) and isinstance(wait.get("message"), str):
            waits[info["deployment"]] = wait["message"][:512]
    return waits

_TIMEOUT = aiohttp.ClientTimeout(total=3.0)


class GatewayStatus:
    def __init__(self, url_template: str, api_key: str | None = None) -> None:
        self.url_template = url_template
        self.api_key = api_key

    def url(self, namespace: str, ray_service: str) -> str:
        base = self.url_template.format(name=ray_service, namespace=namespace).rstrip("/")
        return f"{base}/status"

    async def demands(self, namespace: str, ray_service: str) -> dict[str, Demand]:
        """`namespace/name` → demand; empty when the gateway cannot be read."""
        body = await self._status(namespace, ray_service, "no activation demand read")
        return demands_from_gateway_status(body) if body is not None else {}

    async def gpu_waits(self, namespace: str, ray_service: str) -> dict[str, str]:
        """`namespace/name` → what its replica waits for (a GPU share and who holds it); empty when
        none waits or the gateway cannot be read."""
        body = await self._status(namespace, ray_service, "no GPU waits read")
        return gpu_waits_from_gateway_status(body) if body is not None else {}

    async def _status(self, namespace: str, ray_service: str, consequence: str) -> dict[str, Any] | None:
        url = self.url(namespace, ray_service)
        headers = {API_KEY_HEADER: self.api_key} if self.api_key else {}
        try:
            async with aiohttp.ClientSession(timeout=_TIMEOUT) as session, session.get(url, headers=headers) as resp:
                if resp.status != 200:
                    logger.info("gateway %s answered %d; %s", url, resp.status, consequence)
                    return None
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            logger.info("cannot read the gateway %s: %r; %s", url, exc, consequence)
            return None
        return body if isinstance(body, dict) else None

    async def wait_demand(self, namespace: str, ray_service: str, since: int,
                          timeout_s: float = 30.0) -> tuple[int, dict[str, Demand]] | None:
        """Long-poll the gateway's `GET /demand`: (seq, demands) as soon as a demand newer than
        `since` is recorded (or at `timeout_s`); None when the gateway cannot be read."""
        base = self.url_template.format(name=ray_service, namespace=namespace).rstrip("/")
        url = f"{base}/demand?since={since}&timeout={timeout_s:g}"
        headers = {API_KEY_HEADER: self.api_key} if self.api_key else {}
        timeout = aiohttp.ClientTimeout(total=timeout_s + 10)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url, headers=headers) as resp:
                if resp.status != 200:
                    return None
                body = await resp.json(content_type=None)
            return int(body["seq"]), demands_from_gateway_status(body)
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            logger.debug("cannot long-poll the gateway %s: %r", url, exc)
            return None

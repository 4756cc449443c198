"""Posts Kubernetes Events about objects: best effort, one place, one clock."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ndif_operator.operator.events import event_body
from ndif_operator.operator.kube import KubeApi, KubeError

logger = logging.getLogger("ndif_operator.events")


class EventRecorder:
    def __init__(self, api: KubeApi, clock: Callable[[], datetime]) -> None:
        self.api = api
        self.clock = clock

    async def post(self, obj: dict[str, Any], reason: str, message: str, *, warning: bool) -> None:
        namespace = obj["metadata"].get("namespace") or "default"
        try:
            await self.api.post_event(namespace, event_body(obj, reason=reason, message=message, warning=warning,
                                                            now=self.clock()))
        except KubeError as exc:
            logger.info("could not post event %s: %s", reason, exc)  # events are best effort

"""One ModelDeployment as a planner pass sees it, and the pass's small helpers over many of them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from ndif_operator.api import Estimate, Level, ModelDeployment, Reason
from ndif_operator.api.naming import model_key


@dataclass
class Entry:
    """One ModelDeployment in one pass: the object as read, its parsed spec and what the pass learns."""

    obj: dict[str, Any]
    namespace: str
    name: str
    md: ModelDeployment | None
    invalid: str | None
    deleting: bool
    estimate: Estimate | None = None
    estimate_reason: Reason | None = None
    estimate_message: str = ""
    activated_until: datetime | None = None
    activated: bool = False  # Hot on request in this pass

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def generation(self) -> int:
        return int(self.obj["metadata"].get("generation") or 1)

    @property
    def status(self) -> dict[str, Any]:
        return dict(self.obj.get("status") or {})

    def effective(self) -> ModelDeployment:
        """The deployment as planned: a model activated on request is asked for Hot."""
        assert self.md is not None
        if not self.activated:
            return self.md
        return self.md.model_copy(update={"spec": self.md.spec.model_copy(update={"level": Level.HOT})})


def parse_entry(obj: dict[str, Any]) -> Entry:
    meta = obj["metadata"]
    md: ModelDeployment | None = None
    invalid: str | None = None
    try:
        md = ModelDeployment.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        invalid = f"{where}: {first['msg']}{more}"
    return Entry(obj=obj, namespace=meta["namespace"], name=meta["name"], md=md, invalid=invalid,
                 deleting=bool(meta.get("deletionTimestamp")))


def reject_duplicates(entries: list[Entry]) -> None:
    """Two live deployments of one repo id in one RayService: the oldest serves, the rest are invalid."""
    owners: dict[str, Entry] = {}
    live = [e for e in entries if e.md is not None and not e.deleting]
    for entry in sorted(live, key=lambda e: (str(e.obj["metadata"].get("creationTimestamp") or ""), e.key)):
        assert entry.md is not None
        key = model_key(entry.md.spec.model.repo_id)
        if key in owners:
            entry.invalid = f"model {key!r} is already served by {owners[key].key} in this RayService"
        else:
            owners[key] = entry


async def for_each(entries: list[Entry], work: Callable[[Entry], Awaitable[None]], limit: int = 8) -> None:
    """Run `work` per object with bounded concurrency; the first error wins after all finish."""
    gate = asyncio.Semaphore(limit)

    async def bounded(entry: Entry) -> None:
        async with gate:
            await work(entry)

    results = await asyncio.gather(*(bounded(e) for e in entries), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


def parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None

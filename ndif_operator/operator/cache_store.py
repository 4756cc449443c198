"""The evaluator cache kept in the cluster: one ConfigMap, loaded at start, watched, written back per pass.

Evaluations cost checkpoint I/O (ranged reads, or a meta-device Job); the ConfigMap makes them
survive operator restarts. Writes are merge patches of only the changed keys, conditional on the
resourceVersion the operator last saw: a 409 means another writer (an older replica during a
Recreate rollout, an admin) got there first, so the store re-reads, keeps both sides' entries
and tries again. The ConfigMap is watched (`watch`): entries that others add or change (an
admin, a second operator, a script pre-sizing checkpoints) are taken in as they land, and the
planner is told so that failed estimates are retried at once. Without RBAC on ConfigMaps the
cache still works, in memory only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from ndif_operator.evaluation import EstimateCache
from ndif_operator.operator.kube import KubeApi, KubeError

logger = logging.getLogger("ndif_operator.cache_store")

_ATTEMPTS = 3
_WATCH_SECONDS = 300  # one watch request's server-side timeout; it then resumes from the last version
_WATCH_BACKOFF_MAX = 60.0


class CacheStore:
    def __init__(self, api: KubeApi, namespace: str, name: str, cache: EstimateCache | None = None) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name
        self.cache = cache if cache is not None else EstimateCache()
        self.loaded = False
        self.writes = 0  # merge patches and creates sent (tests and metrics read it)
        self._persisted: dict[str, str] = {}  # the ConfigMap data as last read or written
        self._resource_version: str | None = None  # None: the ConfigMap does not exist (yet)
        self._disabled = False  # no RBAC: memory only

    @property
    def where(self) -> str:
        return f"ConfigMap {self.namespace}/{self.name}"

    async def load(self) -> None:
        """Read the ConfigMap and add its entries to the cache (entries already in memory win)."""
        try:
            body = await self.api.get_config_map(self.namespace, self.name)
        except KubeError as exc:
            if exc.status not in (401, 403):
                raise
            logger.warning("cannot read the evaluator cache %s (%s); keeping it in memory only", self.where, exc)
            self._disabled = True
            self.loaded = True
            return
        self._persisted = dict((body or {}).get("data") or {})
        self._resource_version = (body or {}).get("metadata", {}).get("resourceVersion") if body else None
        stored = EstimateCache.from_configmap_data(self._persisted)
        for entry in stored:
            if self.cache.get(entry.key) is None:
                self.cache.put(entry)
        self.loaded = True
        if len(stored):
            logger.info("loaded %d evaluator cache entries from %s", len(stored), self.where)

    async def save(self) -> None:
        """Write the entries the ConfigMap lacks: one request when nothing races, none when unchanged."""
        if self._disabled or not self.cache.dirty:
            return  # nothing was put since the last save: no serialising, no request
        # Cleared first: an entry put while the request below is in flight marks it again.
        self.cache.dirty = False
        try:
            if await self._write():
                return
        except BaseException:
            self.cache.dirty = True
            raise
        self.cache.dirty = True
        logger.warning("evaluator cache %s: still conflicting after %d attempts; next pass retries",
                       self.where, _ATTEMPTS)

    async def _write(self) -> bool:
        """Merge-patch what changed; False when every attempt conflicted."""
        for _ in range(_ATTEMPTS):
            wanted = self.cache.to_configmap_data()
            changed = {k: v for k, v in wanted.items() if self._persisted.get(k) != v}
            if not changed:
                return True
            try:
                if self._resource_version is None:
                    body = await self.api.create_config_map(self.namespace, self.name, wanted)
                else:
                    body = await self.api.patch_config_map_data(self.namespace, self.name, changed,
                                                                self._resource_version)
            except KubeError as exc:
                if exc.status in (404, 409):
                    await self.load()  # created, written or deleted by someone else: re-read and retry
                    continue
                if exc.status in (401, 403):
                    logger.warning("cannot write the evaluator cache %s (%s); memory only", self.where, exc)
                    self._disabled = True
                    return True
                raise
            self.writes += 1
            self._persisted = dict(body.get("data") or {})
            self._resource_version = body.get("metadata", {}).get("resourceVersion")
            return True
        return False

    def apply(self, body: dict[str, Any] | None) -> bool:
        """Take in the ConfigMap as the server has it now; True when it brought entries we lacked or
        changed one (our own writes coming back change nothing)."""
        data = dict((body or {}).get("data") or {})
        self._resource_version = (body or {}).get("metadata", {}).get("resourceVersion") if body else None
        self.loaded = True
        if data == self._persisted:
            return False
        self._persisted = data
        changed = False
        for entry in EstimateCache.from_configmap_data(data):
            if self.cache.get(entry.key) != entry:
                self.cache.put(entry)
                changed = True
        return changed

    async def watch(self, on_change: Callable[[], None]) -> None:
        """Follow the ConfigMap until cancelled; `on_change()` after each change from elsewhere."""
        resource_version: str | None = None
        backoff = 1.0
        trouble: str | None = None
        loop = asyncio.get_running_loop()
        while not self._disabled:
            started = loop.time()
            try:
                # No version: the server first sends the ConfigMap as it is (ADDED), then changes.
                async for kind, body in self.api.watch_config_map(self.namespace, self.name, resource_version or "",
                                                                  _WATCH_SECONDS):
                    resource_version = body.get("metadata", {}).get("resourceVersion") or resource_version
                    if kind == "BOOKMARK":
                        continue
                    if kind == "DELETED":
                        self._persisted, self._resource_version = {}, None  # the next save creates it again
                        continue
                    if self.apply(body):
                        logger.info("evaluator cache %s changed: %d entries", self.where, len(self.cache))
                        on_change()
                if trouble is not None:
                    logger.warning("watching the evaluator cache %s again", self.where)
                trouble, backoff = None, 1.0
                if loop.time() - started < 1.0:
                    await asyncio.sleep(1.0)  # a server that ends watches at once is not asked in a loop
            except KubeError as exc:
                if exc.status == 410:
                    resource_version = None  # too old: start again from the current state
                    continue
                if exc.status in (401, 403):
                    logger.warning("cannot watch the evaluator cache %s (%s); changes by others are seen "
                                   "after a restart", self.where, exc)
                    return
                if str(exc) != trouble:
                    logger.warning("watching the evaluator cache %s failed (%s); retrying with backoff", self.where,
                                   exc)
                    trouble = str(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _WATCH_BACKOFF_MAX)

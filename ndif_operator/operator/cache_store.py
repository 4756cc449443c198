"""The evaluator cache kept in the cluster: one ConfigMap, loaded at start, written back per pass.

Evaluations cost checkpoint I/O (ranged reads, or a meta-device Job); the ConfigMap makes them
survive operator restarts. Writes are merge patches of only the changed keys, conditional on the
resourceVersion the operator last saw: a 409 means another writer (an older replica during a
Recreate rollout, an admin) got there first, so the store re-reads, keeps both sides' entries
and tries again. Without RBAC on ConfigMaps the cache still works, in memory only.
"""

from __future__ import annotations

import logging

from ndif_operator.evaluation import EstimateCache
from ndif_operator.operator.kube import KubeApi, KubeError

logger = logging.getLogger("ndif_operator.cache_store")

_ATTEMPTS = 3


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

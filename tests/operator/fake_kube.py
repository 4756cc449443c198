"""An in-memory stand-in for `KubeApi`, for unit tests of the operator's parts (KubeRay style).

Same method names and return shapes as `ndif_operator.operator.kube.KubeApi`; every call is logged
in `calls` as (method, namespace, name) so tests can count requests; `fail(method, error, times)`
makes the next calls of a method raise. Semantics kept where the operator depends on them:
resourceVersion bumps on every change and preconditions (409), `replace_status` replaces the whole
status, a merge patch of metadata drops keys set to null, 404 as None for reads.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import itertools
from collections.abc import AsyncIterator
from typing import Any

from ndif_operator.operator.kube import KubeError

Obj = dict[str, Any]
Key = tuple[str, str]


class FakeKubeApi:
    def __init__(self) -> None:
        self.model_deployments: dict[Key, Obj] = {}
        self.ray_services: dict[Key, Obj] = {}
        self.config_maps: dict[Key, Obj] = {}
        self.calendar_schedules: dict[Key, Obj] = {}
        self.secrets: dict[Key, dict[str, str]] = {}
        self.jobs: dict[Key, Obj] = {}
        self.pods: list[Obj] = []
        self.nodes: list[Obj] = []
        self.events: list[Obj] = []  # posted by the operator
        self.ray_service_events: list[Obj] = []  # KubeRay's, answered to list_events
        self.calls: list[tuple[str, str, str]] = []
        self._faults: dict[str, list[KubeError]] = {}
        self._rv = itertools.count(1)
        self._uid = itertools.count(1)

    # --- test helpers -------------------------------------------------------------------------

    def fail(self, method: str, error: KubeError, times: int = 1) -> None:
        self._faults.setdefault(method, []).extend([error] * times)

    def count(self, *methods: str) -> int:
        return sum(1 for call in self.calls if not methods or call[0] in methods)

    def add(self, obj: Obj) -> Obj:
        """Create an object as a client would (ModelDeployment, RayService, ConfigMap, Job)."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        meta.setdefault("generation", 1)
        meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        meta["uid"] = f"uid-{next(self._uid)}"
        meta["resourceVersion"] = str(next(self._rv))
        self._store(obj["kind"])[(meta["namespace"], meta["name"])] = obj
        return obj

    def edit_spec(self, kind: str, namespace: str, name: str, **spec: Any) -> None:
        obj = self._store(kind)[(namespace, name)]
        obj["spec"].update(spec)
        obj["metadata"]["generation"] += 1
        obj["metadata"]["resourceVersion"] = str(next(self._rv))

    def add_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        self.secrets[(namespace, name)] = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}

    def _store(self, kind: str) -> dict[Key, Obj]:
        return {"ModelDeployment": self.model_deployments, "RayService": self.ray_services,
                "ConfigMap": self.config_maps, "Job": self.jobs, "CalendarSchedule": self.calendar_schedules}[kind]

    def _call(self, method: str, namespace: str = "", name: str = "") -> None:
        self.calls.append((method, namespace, name))
        faults = self._faults.get(method)
        if faults:
            raise faults.pop(0)

    def _bump(self, obj: Obj) -> Obj:
        obj["metadata"]["resourceVersion"] = str(next(self._rv))
        return copy.deepcopy(obj)

    @staticmethod
    def _precondition(obj: Obj, resource_version: str | None) -> None:
        if resource_version and resource_version != obj["metadata"]["resourceVersion"]:
            raise KubeError(409, "the object has been modified; please apply your changes to the latest version",
                            "Conflict")

    def _get(self, store: dict[Key, Obj], namespace: str, name: str) -> Obj:
        if (namespace, name) not in store:
            raise KubeError(404, f'"{name}" not found', "NotFound")
        return store[(namespace, name)]

    # --- KubeApi ------------------------------------------------------------------------------

    async def close(self) -> None:
        pass

    async def list_model_deployments(self, namespaces: list[str]) -> list[Obj]:
        self._call("list_model_deployments")
        return [copy.deepcopy(o) for (ns, _), o in sorted(self.model_deployments.items())
                if not namespaces or ns in namespaces]

    async def get_ray_service(self, namespace: str, name: str) -> Obj | None:
        self._call("get_ray_service", namespace, name)
        found = self.ray_services.get((namespace, name))
        return copy.deepcopy(found) if found is not None else None

    async def patch_serve_config(self, namespace: str, name: str, text: str) -> None:
        self._call("patch_serve_config", namespace, name)
        obj = self._get(self.ray_services, namespace, name)
        obj["spec"]["serveConfigV2"] = text
        self._bump(obj)

    async def replace_status(self, namespace: str, name: str, status: Obj) -> Obj:
        self._call("replace_status", namespace, name)
        obj = self._get(self.model_deployments, namespace, name)
        obj["status"] = copy.deepcopy(status)
        return self._bump(obj)

    async def patch_metadata(self, namespace: str, name: str, metadata: Obj) -> Obj:
        self._call("patch_metadata", namespace, name)
        obj = self._get(self.model_deployments, namespace, name)
        patch = dict(metadata)
        self._precondition(obj, patch.pop("resourceVersion", None))
        for key, value in patch.items():
            if value is None:
                obj["metadata"].pop(key, None)
            elif isinstance(value, dict):
                merged = {**obj["metadata"].get(key, {}), **value}
                obj["metadata"][key] = {k: v for k, v in merged.items() if v is not None}
            else:
                obj["metadata"][key] = value
        if obj["metadata"].get("deletionTimestamp") and not obj["metadata"].get("finalizers"):
            del self.model_deployments[(namespace, name)]
        return self._bump(obj)

    async def get_config_map(self, namespace: str, name: str) -> Obj | None:
        self._call("get_config_map", namespace, name)
        found = self.config_maps.get((namespace, name))
        return copy.deepcopy(found) if found is not None else None

    async def create_config_map(self, namespace: str, name: str, data: dict[str, str]) -> Obj:
        self._call("create_config_map", namespace, name)
        if (namespace, name) in self.config_maps:
            raise KubeError(409, f'configmaps "{name}" already exists', "AlreadyExists")
        return copy.deepcopy(self.add({"apiVersion": "v1", "kind": "ConfigMap",
                                       "metadata": {"name": name, "namespace": namespace}, "data": dict(data)}))

    async def patch_config_map_data(self, namespace: str, name: str, data: dict[str, str],
                                    resource_version: str) -> Obj:
        self._call("patch_config_map_data", namespace, name)
        obj = self._get(self.config_maps, namespace, name)
        self._precondition(obj, resource_version)
        obj.setdefault("data", {}).update(data)
        return self._bump(obj)

    async def watch_config_map(self, namespace: str, name: str, resource_version: str,
                               timeout_seconds: int) -> AsyncIterator[tuple[str, Obj]]:
        self._call("watch_config_map", namespace, name)
        await asyncio.Event().wait()  # a stream that never sends: tests call CacheStore.apply directly
        yield "BOOKMARK", {}

    async def list_calendar_schedules(self, namespace: str) -> tuple[list[Obj], str]:
        self._call("list_calendar_schedules", namespace)
        items = [copy.deepcopy(o) for (ns, _), o in sorted(self.calendar_schedules.items()) if ns == namespace]
        return items, str(next(self._rv))

    async def watch_calendar_schedules(self, namespace: str, resource_version: str,
                                       timeout_seconds: int) -> AsyncIterator[tuple[str, Obj]]:
        self._call("watch_calendar_schedules", namespace)
        await asyncio.Event().wait()  # a stream that never sends: tests call Calendars.observe directly
        yield "BOOKMARK", {}

    async def replace_calendar_schedule_status(self, namespace: str, name: str, status: Obj) -> Obj:
        self._call("replace_calendar_schedule_status", namespace, name)
        obj = self._get(self.calendar_schedules, namespace, name)
        obj["status"] = copy.deepcopy(status)
        return copy.deepcopy(self._bump(obj))

    async def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        self._call("read_secret", namespace, name)
        data = self.secrets.get((namespace, name))
        return None if data is None else {k: base64.b64decode(v).decode() for k, v in data.items()}

    async def get_job(self, namespace: str, name: str) -> Obj | None:
        self._call("get_job", namespace, name)
        found = self.jobs.get((namespace, name))
        return copy.deepcopy(found) if found is not None else None

    async def create_job(self, namespace: str, body: Obj) -> None:
        self._call("create_job", namespace, body["metadata"]["name"])
        if (namespace, body["metadata"]["name"]) in self.jobs:
            raise KubeError(409, "already exists", "AlreadyExists")
        self.add(body)

    async def list_pods(self, namespace: str, label_selector: str) -> list[Obj]:
        self._call("list_pods", namespace)
        key, _, value = label_selector.partition("=")
        return [copy.deepcopy(p) for p in self.pods if (p["metadata"].get("labels") or {}).get(key) == value]

    async def list_nodes(self) -> list[Obj]:
        self._call("list_nodes")
        return copy.deepcopy(self.nodes)

    async def list_events(self, namespace: str, field_selector: str) -> list[Obj]:
        self._call("list_events", namespace)
        return copy.deepcopy(self.ray_service_events)

    async def post_event(self, namespace: str, body: Obj) -> None:
        self._call("post_event", namespace, str(body.get("reason")))
        self.events.append(copy.deepcopy(body))

    def reasons(self) -> list[str]:
        """Reasons of the Events the operator posted, in order."""
        return [str(e["reason"]) for e in self.events]


READS = ("list_model_deployments", "get_ray_service", "get_config_map", "read_secret", "get_job", "list_pods",
         "list_nodes", "list_events")
WRITES = ("patch_serve_config", "replace_status", "patch_metadata", "create_config_map", "patch_config_map_data",
          "create_job", "post_event")

"""The operator's only Kubernetes API calls (besides kopf's watches), over kubernetes_asyncio.

Each method is declared in rbac.API_CALLS (resource, verbs, scope): the RBAC is generated from
there, and a test fails when a method is missing there or makes other requests than declared.

Every method returns plain dicts and raises `KubeError`, which keeps the HTTP status (so callers
tell a conflict, retried at once with fresh reads, from a server error, retried with backoff) and
the server's own message (the `Status.message` that names the field and the rule), and also
stands for "the API server cannot be reached" (status 0) so that an outage is one kind of error.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import aiohttp
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from ndif_operator.api import GROUP, PLURAL, VERSION
from ndif_operator.api.calendar import PLURAL as CALENDAR_PLURAL
from ndif_operator.operator import metrics
from ndif_operator.operator.login import Login
from ndif_operator.operator.rbac import RAY_GROUP, RAY_PLURAL

RAY_VERSION = "v1"
# The generated client picks JSON-patch for list bodies and may guess wrong for dicts: say which.
# Every write names the operator as its field manager (managedFields), not the client's user agent.
FIELD_MANAGER = "ndif-operator"
_WRITE_KW: dict[str, Any] = {"field_manager": FIELD_MANAGER}
_MERGE_KW: dict[str, Any] = {"_content_type": "application/merge-patch+json", **_WRITE_KW}
_JSON_PATCH_KW: dict[str, Any] = {"_content_type": "application/json-patch+json", **_WRITE_KW}
UNREACHABLE = 0  # KubeError.status when no HTTP answer came back

T = TypeVar("T")


class KubeError(Exception):
    """An API call failed: `status` (0: no answer), `reason` (e.g. Conflict), the server's message."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        head = f"{status} {reason}".strip() if status else "API server unreachable"
        super().__init__(f"{head}: {message}" if message and message != reason else head)
        self.status = status
        self.reason = reason
        self.message = message


def api_error(exc: ApiException) -> KubeError:
    """The server's `Status` (its message names the field and rule), else what the client saw."""
    status = int(exc.status or 0)
    reason = str(exc.reason or "")
    message = ""
    body = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else exc.body
    if body:
        try:
            parsed = json.loads(body)
        except ValueError:
            message = str(body).strip()[:1024]
        else:
            if isinstance(parsed, dict):
                message = str(parsed.get("message") or "")
                reason = str(parsed.get("reason") or reason)
    return KubeError(status, message or reason or "API error", reason)


async def _watch(list_call: Any, *args: Any, **kwargs: Any) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(event type, raw object) of one watch request (bookmarks included), errors as KubeError."""
    stream = watch.Watch().stream(list_call, *args, allow_watch_bookmarks=True, **kwargs)
    try:
        async with stream as events:
            async for event in events:
                yield str(event["type"]), dict(event["raw_object"])
    except ApiException as exc:
        raise api_error(exc) from exc
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise KubeError(UNREACHABLE, f"{type(exc).__name__}: {exc}") from exc


async def _call(awaitable: Awaitable[T], *, absent: tuple[int, ...] = ()) -> T | None:
    """Await one API call: None when its status is in `absent`, else the answer or a KubeError."""
    try:
        return await awaitable
    except ApiException as exc:
        if exc.status in absent:
            return None
        metrics.API_ERRORS.labels(str(exc.status or UNREACHABLE)).inc()
        raise api_error(exc) from exc
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        metrics.API_ERRORS.labels(str(UNREACHABLE)).inc()
        raise KubeError(UNREACHABLE, f"{type(exc).__name__}: {exc}") from exc


async def _must(awaitable: Awaitable[T]) -> T:
    result = await _call(awaitable)
    assert result is not None
    return result


class KubeApi:
    def __init__(self, api_client: client.ApiClient) -> None:
        self._client = api_client
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)
        self._batch = client.BatchV1Api(api_client)

    @classmethod
    def connect(cls, login: Login) -> KubeApi:
        """A client with `login`'s credentials; its token is re-read before every request (rotation)."""
        credentials = login.current()
        configuration = client.Configuration(host=credentials.server)
        configuration.verify_ssl = not credentials.insecure
        configuration.ssl_ca_cert = credentials.ca_path
        configuration.cert_file = credentials.certificate_path
        configuration.key_file = credentials.private_key_path
        if credentials.token:
            configuration.api_key["BearerToken"] = credentials.token
            configuration.api_key_prefix["BearerToken"] = "Bearer"

            def refresh(configuration: client.Configuration) -> None:
                configuration.api_key["BearerToken"] = login.current().token

            configuration.refresh_api_key_hook = refresh
        return cls(client.ApiClient(configuration))

    async def close(self) -> None:
        await self._client.close()

    def _plain(self, obj: Any) -> dict[str, Any]:
        sanitized: dict[str, Any] = self._client.sanitize_for_serialization(obj)
        return sanitized

    async def list_model_deployments(self, namespaces: list[str]) -> list[dict[str, Any]]:
        if not namespaces:
            body = await _must(self._custom.list_cluster_custom_object(GROUP, VERSION, PLURAL))
            return list(body.get("items") or [])
        items: list[dict[str, Any]] = []
        for namespace in namespaces:
            body = await _must(self._custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL))
            items.extend(body.get("items") or [])
        return items

    async def get_ray_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        body: dict[str, Any] | None = await _call(self._custom.get_namespaced_custom_object(
            RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, name), absent=(404,))
        return body

    async def patch_serve_config(self, namespace: str, name: str, text: str) -> None:
        """Merge-patch `spec.serveConfigV2` alone: rayClusterConfig is never touched."""
        await _call(self._custom.patch_namespaced_custom_object(
            RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, name, {"spec": {"serveConfigV2": text}}, **_MERGE_KW))

    async def replace_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """Set the whole `status` through the status subresource (a JSON patch `add /status`).

        `add` replaces the member when present and creates it when not, so fields that are no
        longer true disappear (a merge patch would keep every key it does not set to null).
        """
        body: dict[str, Any] = await _must(self._custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, [{"op": "add", "path": "/status", "value": status}],
            **_JSON_PATCH_KW))
        return body

    async def patch_metadata(self, namespace: str, name: str, metadata: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch metadata; include `resourceVersion` to make it conditional (409 when stale)."""
        body: dict[str, Any] = await _must(self._custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, {"metadata": metadata}, **_MERGE_KW))
        return body

    async def get_config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        body = await _call(self._core.read_namespaced_config_map(name, namespace), absent=(404,))
        return None if body is None else self._plain(body)

    async def create_config_map(self, namespace: str, name: str, data: dict[str, str]) -> dict[str, Any]:
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": namespace},
                "data": data}
        return self._plain(await _must(self._core.create_namespaced_config_map(namespace, body, **_WRITE_KW)))  # type: ignore[arg-type]

    async def patch_config_map_data(self, namespace: str, name: str, data: dict[str, str],
                                    resource_version: str) -> dict[str, Any]:
        """Merge-patch `data` conditionally on `resource_version` (409 when someone wrote meanwhile)."""
        patch = {"metadata": {"resourceVersion": resource_version}, "data": data}
        return self._plain(await _must(self._core.patch_namespaced_config_map(name, namespace, patch, **_MERGE_KW)))

    async def watch_config_map(self, namespace: str, name: str, resource_version: str,
                               timeout_seconds: int) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(event type, object) for one ConfigMap from `resource_version` on, for at most the timeout."""
        async for event in _watch(self._core.list_namespaced_config_map, namespace,
                                  field_selector=f"metadata.name={name}", resource_version=resource_version,
                                  timeout_seconds=timeout_seconds):
            yield event

    async def list_calendar_schedules(self, namespace: str) -> tuple[list[dict[str, Any]], str]:
        """The CalendarSchedules of `namespace` and the list's resourceVersion (to watch from)."""
        body: dict[str, Any] = await _must(self._custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, CALENDAR_PLURAL))
        return list(body.get("items") or []), str((body.get("metadata") or {}).get("resourceVersion") or "")

    async def watch_calendar_schedules(self, namespace: str, resource_version: str,
                                       timeout_seconds: int) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(event type, object) for the CalendarSchedules of `namespace` from `resource_version` on."""
        async for event in _watch(self._custom.list_namespaced_custom_object, GROUP, VERSION, namespace,
                                  CALENDAR_PLURAL, resource_version=resource_version, timeout_seconds=timeout_seconds):
            yield event

    async def replace_calendar_schedule_status(self, namespace: str, name: str,
                                               status: dict[str, Any]) -> dict[str, Any]:
        """Set a CalendarSchedule's whole `status` (JSON patch `add /status`, as `replace_status`)."""
        body: dict[str, Any] = await _must(self._custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, CALENDAR_PLURAL, name, [{"op": "add", "path": "/status", "value": status}],
            **_JSON_PATCH_KW))
        return body

    async def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        """A Secret's data, decoded (None when it does not exist)."""
        body = await _call(self._core.read_namespaced_secret(name, namespace), absent=(404,))
        if body is None:
            return None
        data = self._plain(body).get("data") or {}
        return {str(k): base64.b64decode(v).decode(errors="replace") for k, v in data.items()}

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        body = await _call(self._batch.read_namespaced_job(name, namespace), absent=(404,))
        return None if body is None else self._plain(body)

    async def create_job(self, namespace: str, body: dict[str, Any]) -> None:
        await _call(self._batch.create_namespaced_job(namespace, body, **_WRITE_KW))  # type: ignore[arg-type]

    async def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        pods = await _must(self._core.list_namespaced_pod(namespace, label_selector=label_selector))
        return list(self._plain(pods).get("items") or [])

    async def list_nodes(self) -> list[dict[str, Any]]:
        # No RBAC on nodes: GPU memory must come from annotations then.
        nodes = await _call(self._core.list_node(), absent=(401, 403, 404))
        return [] if nodes is None else list(self._plain(nodes).get("items") or [])

    async def list_events(self, namespace: str, field_selector: str) -> list[dict[str, Any]]:
        # Without RBAC on events, KubeRay's failures show only via its conditions.
        events = await _call(self._core.list_namespaced_event(namespace, field_selector=field_selector),
                             absent=(401, 403, 404))
        return [] if events is None else list(self._plain(events).get("items") or [])

    async def post_event(self, namespace: str, body: dict[str, Any]) -> None:
        await _call(self._core.create_namespaced_event(namespace, body, **_WRITE_KW))  # type: ignore[arg-type]


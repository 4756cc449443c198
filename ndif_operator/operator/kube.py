"""The operator's only Kubernetes API calls (besides kopf's watches), over kubernetes_asyncio.

Each method is declared in rbac.API_CALLS (resource, verbs, scope): the RBAC is generated from
there, and a test fails when a method is missing there or makes other requests than declared.

Every method returns plain dicts and raises `KubeError` (status code kept) so the reconciler can
tell a conflict (409, retried at once with fresh reads) from a server error (backoff).
"""

from __future__ import annotations

from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from ndif_operator.api import GROUP, PLURAL, VERSION
from ndif_operator.operator.login import Login
from ndif_operator.operator.rbac import RAY_GROUP, RAY_PLURAL

RAY_VERSION = "v1"
# The generated client picks JSON-patch for list bodies and may guess wrong for dicts: force merge.
_MERGE_KW: dict[str, Any] = {"_content_type": "application/merge-patch+json"}


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def _error(exc: ApiException) -> KubeError:
    return KubeError(int(exc.status or 0), str(exc.reason or exc.body or "API error"))


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

    async def list_model_deployments(self, namespaces: list[str]) -> list[dict[str, Any]]:
        try:
            if not namespaces:
                body = await self._custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
                return list(body.get("items") or [])
            items: list[dict[str, Any]] = []
            for namespace in namespaces:
                body = await self._custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
                items.extend(body.get("items") or [])
            return items
        except ApiException as exc:
            raise _error(exc) from exc

    async def get_ray_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            body: dict[str, Any] = await self._custom.get_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, name)
            return body
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _error(exc) from exc

    async def patch_serve_config(self, namespace: str, name: str, text: str) -> None:
        """Merge-patch `spec.serveConfigV2` alone: rayClusterConfig is never touched."""
        try:
            await self._custom.patch_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, name, {"spec": {"serveConfigV2": text}},
                **_MERGE_KW)
        except ApiException as exc:
            raise _error(exc) from exc

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        try:
            body: dict[str, Any] = await self._custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, {"status": status}, **_MERGE_KW)
            return body
        except ApiException as exc:
            raise _error(exc) from exc

    async def patch_metadata(self, namespace: str, name: str, metadata: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch metadata; include `resourceVersion` to make it conditional (409 when stale)."""
        try:
            body: dict[str, Any] = await self._custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, {"metadata": metadata}, **_MERGE_KW)
            return body
        except ApiException as exc:
            raise _error(exc) from exc

    async def get_config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            body = await self._core.read_namespaced_config_map(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _error(exc) from exc
        sanitized: dict[str, Any] = self._client.sanitize_for_serialization(body)
        return sanitized

    async def create_config_map(self, namespace: str, name: str, data: dict[str, str]) -> dict[str, Any]:
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": namespace},
                "data": data}
        try:
            created = await self._core.create_namespaced_config_map(namespace, body)  # type: ignore[arg-type]
        except ApiException as exc:
            raise _error(exc) from exc
        sanitized: dict[str, Any] = self._client.sanitize_for_serialization(created)
        return sanitized

    async def patch_config_map_data(self, namespace: str, name: str, data: dict[str, str],
                                    resource_version: str) -> dict[str, Any]:
        """Merge-patch `data` conditionally on `resource_version` (409 when someone wrote meanwhile)."""
        patch = {"metadata": {"resourceVersion": resource_version}, "data": data}
        try:
            written = await self._core.patch_namespaced_config_map(name, namespace, patch, **_MERGE_KW)
        except ApiException as exc:
            raise _error(exc) from exc
        sanitized: dict[str, Any] = self._client.sanitize_for_serialization(written)
        return sanitized

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            body = await self._batch.read_namespaced_job(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _error(exc) from exc
        sanitized: dict[str, Any] = self._client.sanitize_for_serialization(body)
        return sanitized

    async def create_job(self, namespace: str, body: dict[str, Any]) -> None:
        try:
            await self._batch.create_namespaced_job(namespace, body)  # type: ignore[arg-type]
        except ApiException as exc:
            raise _error(exc) from exc

    async def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        try:
            pods = await self._core.list_namespaced_pod(namespace, label_selector=label_selector)
        except ApiException as exc:
            raise _error(exc) from exc
        sanitized: dict[str, Any] = self._client.sanitize_for_serialization(pods)
        return list(sanitized.get("items") or [])

    async def list_nodes(self) -> list[dict[str, Any]]:
        try:
            nodes = await self._core.list_node()
        except ApiException as exc:
            if exc.status in (401, 403, 404):
                return []  # no RBAC on nodes: GPU memory must come from annotations then
            raise _error(exc) from exc
        sanitized: dict[str, Any] = self._client.sanitize_for_serialization(nodes)
        return list(sanitized.get("items") or [])

    async def list_events(self, namespace: str, field_selector: str) -> list[dict[str, Any]]:
        try:
            events = await self._core.list_namespaced_event(namespace, field_selector=field_selector)
        except ApiException as exc:
            if exc.status in (401, 403, 404):
                return []  # without RBAC on events, KubeRay's failures show only via its conditions
            raise _error(exc) from exc
        sanitized: dict[str, Any] = self._client.sanitize_for_serialization(events)
        return list(sanitized.get("items") or [])

    async def post_event(self, namespace: str, body: dict[str, Any]) -> None:
        try:
            await self._core.create_namespaced_event(namespace, body)  # type: ignore[arg-type]
        except ApiException as exc:
            raise _error(exc) from exc

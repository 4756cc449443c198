"""An in-memory Kubernetes API server over real HTTP, for kopf, kubectl and the Python clients.

It keeps the API semantics the operator relies on (see tests/README.md for what it leaves out):
resourceVersion on every write and 409 on a stale one, metadata.generation bumped on spec changes
only, status and scale subresources, finalizers with deletionTimestamp, watch with resume from a
resourceVersion (410 once compacted) and bookmarks, JSON merge patch and JSON patch (422 when a
`test` op fails), Table output for kubectl's printer columns, and CR validation through a hook.

The server runs its own event loop in a daemon thread, so tests may block (subprocess kubectl, a
kopf thread) without starving it. Every mutation happens on that loop; the sync accessors hop onto
it with run_coroutine_threadsafe.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import copy
import json
import re
import secrets
import shutil
import ssl
import tempfile
import threading
import uuid
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import jsonpatch
import yaml
from aiohttp import web

from kube_emulator import fields, jsonpath
from kube_emulator.auth import ADMIN, Attributes, Authorizer, Identity, attributes, forbidden
from kube_emulator.resources import (
    CONFIG_MAPS,
    CRDS,
    EVENTS,
    JOBS,
    NAMESPACES,
    NODES,
    PODS,
    RAY_SERVICE,
    RBAC_TYPES,
    SECRETS,
    SERVICE_ACCOUNTS,
    ResourceType,
)
from kube_emulator.tls import CertificateAuthority, client_identity

T = TypeVar("T")
Obj = dict[str, Any]
_MERGE = "application/merge-patch+json"
_JSON_PATCH = "application/json-patch+json"
_STRATEGIC = "application/strategic-merge-patch+json"
_APPLY = "application/apply-patch+yaml"
# The field manager of the write being served (HTTP: ?fieldManager= or the User-Agent; sync accessors: this).
_MANAGER: contextvars.ContextVar[str] = contextvars.ContextVar("manager", default="kube-emulator-test")
_LOG_AS = web.RequestKey("log_as", object)  # makes this request's log entry for a given status
_LOGGED = web.RequestKey("logged", bool)  # already logged (a watch, when it started)


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def response(self) -> web.Response:
        body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                "message": self.message, "reason": self.reason, "code": self.code}
        if self.details is not None:
            body["details"] = self.details
        return web.json_response(body, status=self.code)


@dataclass
class Fault:
    """Answer `remaining` matching requests with `code` before touching the store."""

    method: str
    path: re.Pattern[str]
    code: int
    remaining: int
    reason: str = "InternalError"


@dataclass(frozen=True)
class Logged:
    method: str
    path: str
    status: int
    content_type: str
    user: str = ""  # the authenticated user ("" when authentication failed)
    attrs: Attributes | None = None  # what RBAC saw: verb, group, resource, subresource, namespace


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _human_age(timestamp: str) -> str:
    try:
        then = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except (TypeError, ValueError):
        return "<unknown>"
    seconds = max(0, int((datetime.now(UTC) - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _matches_labels(obj: Obj, selector: str) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _matches_fields(obj: Obj, selector: str) -> bool:
    """Field selectors on dotted paths (Kubernetes supports a per-type subset: metadata.name and
    metadata.namespace everywhere, involvedObject.*, reason, type on Events)."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        negate = "!=" in term
        key, value = re.split(r"!=|==|=", term, maxsplit=1)
        actual: Any = obj
        for part in key.split("."):
            actual = actual.get(part) if isinstance(actual, dict) else None
        matched = (str(actual) if actual is not None else "") == value
        if matched == negate:
            return False
    return True


def _fold_string_data(rtype: ResourceType, obj: Obj) -> None:
    """A Secret's `stringData` is write-only: the API server stores it base64-encoded in `data`."""
    if rtype.group == "" and rtype.kind == "Secret" and isinstance(obj.get("stringData"), dict):
        data = obj.setdefault("data", {})
        for key, value in obj.pop("stringData").items():
            data[key] = base64.b64encode(str(value).encode()).decode()


class KubeEmulator:
    """Serve `types` on 127.0.0.1:<random port> until `stop()`.

    `secure` (the default): HTTPS with a certificate from a CA made for this server (`ca_path`),
    every request authenticated (bearer token from `issue_token`, or a client certificate from
    `pki`; 401 otherwise) and authorised by RBAC from the stored roles and bindings (403).
    `admin_token` belongs to `system:masters`. `secure=False`: plain HTTP, anyone may do anything.
    """

    def __init__(self, types: Iterable[ResourceType] = (), *, history_limit: int = 50_000,
                 bookmark_interval: float = 10.0, secure: bool = True) -> None:
        self.types: dict[tuple[str, str, str], ResourceType] = {}
        for rtype in (EVENTS, NAMESPACES, NODES, CRDS, CONFIG_MAPS, SECRETS, JOBS, PODS, RAY_SERVICE,
                      SERVICE_ACCOUNTS, *RBAC_TYPES, *types):
            self.types[rtype.key] = rtype
        self._objects: dict[tuple[str, str, str], dict[tuple[str, str], Obj]] = {k: {} for k in self.types}
        self._history: dict[tuple[str, str, str], list[tuple[int, str, Obj]]] = {k: [] for k in self.types}
        self._compacted: dict[tuple[str, str, str], int] = dict.fromkeys(self.types, 0)
        self._history_limit = history_limit
        self._bookmark_interval = bookmark_interval
        self._rv = 1
        self.faults: list[Fault] = []
        self.log: list[Logged] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Condition | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stopping = False
        self._watch_epoch = 0  # close_watches() ends every watch started before it
        self.url = ""
        self.secure = secure
        self._pki_dir = Path(tempfile.mkdtemp(prefix="kube-emulator-pki-")) if secure else None
        self.pki = CertificateAuthority(self._pki_dir) if self._pki_dir else None
        self.tokens: dict[str, Identity] = {}
        self.admin_token = self.issue_token(ADMIN)
        self._authorizer = Authorizer(self._rbac_objects)

    # --- lifecycle (called from the test thread) ----------------------------------------------

    def start(self) -> str:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def serve() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start_server())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="kube-emulator", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the emulator did not start")
        self.create_sync({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})
        return self.url

    async def _start_server(self) -> None:
        self._changed = asyncio.Condition()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        ssl_context = self.pki.server_context() if self.pki is not None else None
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        sockets = site._server.sockets  # type: ignore[union-attr]
        scheme = "https" if ssl_context is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return

        async def shutdown() -> None:
            self._stopping = True
            assert self._changed is not None
            async with self._changed:
                self._changed.notify_all()
            assert self._runner is not None
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None
        if self._pki_dir is not None:
            shutil.rmtree(self._pki_dir, ignore_errors=True)

    # --- identities -----------------------------------------------------------------------------

    @property
    def ca_path(self) -> Path | None:
        return self.pki.cert_path if self.pki is not None else None

    def close_watches(self) -> None:
        """End every open watch, as an API server restart does: clients reconnect (and log in)."""
        async def close() -> None:
            self._watch_epoch += 1
            assert self._changed is not None
            async with self._changed:
                self._changed.notify_all()
        self._call(close())

    def issue_token(self, identity: Identity) -> str:
        token = secrets.token_urlsafe(24)
        self.tokens[token] = identity
        return token

    def revoke_token(self, token: str) -> None:
        self.tokens.pop(token, None)

    def client_ssl_context(self) -> ssl.SSLContext | None:
        """What a client needs to trust this server (None for plain HTTP)."""
        return ssl.create_default_context(cafile=str(self.ca_path)) if self.ca_path is not None else None

    def auth_headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.admin_token}"}

    def write_kubeconfig(self, path: Path, token: str | None = None) -> Path:
        """A kubeconfig for `token` (default: the admin's) that trusts this server's CA."""
        cluster: dict[str, Any] = {"server": self.url}
        if self.ca_path is not None:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_path.read_bytes()).decode()
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": cluster}],
            "users": [{"name": "tester", "user": {"token": token or self.admin_token}}],
            "contexts": [{"name": "emulator",
                          "context": {"cluster": "emulator", "user": "tester", "namespace": "default"}}],
        }))
        return path

    def _rbac_objects(self, kind: str, namespace: str) -> list[Obj]:
        rtype = next(t for t in RBAC_TYPES if t.kind == kind)
        return [o for (ns, _), o in self._objects[rtype.key].items() if ns == namespace]

    def _authenticate(self, request: web.Request) -> Identity:
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("bearer "):
            identity = self.tokens.get(header[7:].strip())
            if identity is not None:
                return identity
        else:
            ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
            peer = client_identity(ssl_object.getpeercert() if ssl_object is not None else None)
            if peer is not None:
                return Identity(peer[0], (*peer[1], "system:authenticated"))
        raise ApiError(401, "Unauthorized", "Unauthorized")

    # --- sync accessors for tests -------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None, "emulator not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def rtype(self, group: str, version: str, plural: str) -> ResourceType:
        return self.types[(group, version, plural)]

    def get_sync(self, rtype: ResourceType, namespace: str | None, name: str) -> Obj | None:
        async def get() -> Obj | None:
            found = self._objects[rtype.key].get((namespace or "", name))
            return copy.deepcopy(found) if found is not None else None
        return self._call(get())

    def list_sync(self, rtype: ResourceType) -> list[Obj]:
        async def listing() -> list[Obj]:
            return [copy.deepcopy(o) for _, o in sorted(self._objects[rtype.key].items())]
        return self._call(listing())

    def create_sync(self, obj: Obj) -> Obj:
        return self._call(self._create(self._type_of(obj), obj["metadata"].get("namespace"), obj))

    def patch_sync(self, rtype: ResourceType, namespace: str | None, name: str, patch: Obj,
                   *, subresource: str | None = None) -> Obj:
        return self._call(self._patch(rtype, namespace, name, patch, _MERGE, subresource))

    def delete_sync(self, rtype: ResourceType, namespace: str | None, name: str) -> Obj:
        return self._call(self._delete(rtype, namespace, name, {}))

    def inject(self, method: str, path_regex: str, code: int, times: int, reason: str = "") -> Fault:
        reason = reason or {409: "Conflict", 500: "InternalError", 503: "ServiceUnavailable",
                            429: "TooManyRequests"}.get(code, "InternalError")
        fault = Fault(method.upper(), re.compile(path_regex), code, times, reason)
        self.faults.append(fault)
        return fault

    def requests(self, method: str, path_regex: str) -> list[Logged]:
        pattern = re.compile(path_regex)
        return [entry for entry in list(self.log) if entry.method == method and pattern.search(entry.path)]

    def _type_of(self, obj: Obj) -> ResourceType:
        group, _, version = obj["apiVersion"].rpartition("/")
        for rtype in self.types.values():
            if rtype.group == group and rtype.version == version and rtype.kind == obj["kind"]:
                return rtype
        raise KeyError(f"no served type for {obj['apiVersion']} {obj['kind']}")

    # --- store ----------------------------------------------------------------------------------

    async def _record(self, rtype: ResourceType, event: str, obj: Obj) -> None:
        history = self._history[rtype.key]
        history.append((int(obj["metadata"]["resourceVersion"]), event, copy.deepcopy(obj)))
        if len(history) > self._history_limit:
            dropped = history[: len(history) - self._history_limit]
            del history[: len(dropped)]
            self._compacted[rtype.key] = dropped[-1][0]
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _validate(self, rtype: ResourceType, obj: Obj, old: Obj | None) -> None:
        if rtype.default is not None:
            defaulted = rtype.default(obj)
            obj.clear()
            obj.update(defaulted)
        if rtype.validate is None:
            return
        errors = rtype.validate(obj, old)
        if errors:
            name = obj.get("metadata", {}).get("name", "")
            message = f'{rtype.kind} "{name}" is invalid: ' + "; ".join(errors)
            raise ApiError(422, "Invalid", message)

    def _get(self, rtype: ResourceType, namespace: str | None, name: str) -> Obj:
        found = self._objects[rtype.key].get((namespace or "", name))
        if found is None:
            group = f"{rtype.plural}.{rtype.group}" if rtype.group else rtype.plural
            raise ApiError(404, "NotFound", f'{group} "{name}" not found')
        return found

    async def _create(self, rtype: ResourceType, namespace: str | None, body: Obj, *,
                      applied: Obj | None = None) -> Obj:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        if not meta.get("name"):
            raise ApiError(422, "Invalid", "metadata.name: Required value: name or generateName is required")
        if rtype.namespaced:
            if meta.get("namespace") not in (None, namespace):
                raise ApiError(400, "BadRequest", "the namespace of the object does not match the request")
            meta["namespace"] = namespace
        key = (namespace or "", meta["name"]) if rtype.namespaced else ("", meta["name"])
        if key in self._objects[rtype.key]:
            group = f"{rtype.plural}.{rtype.group}" if rtype.group else rtype.plural
            raise ApiError(409, "AlreadyExists", f'{group} "{meta["name"]}" already exists')
        if rtype.status_subresource:
            obj.pop("status", None)  # status is written through /status only
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion"):
            meta.pop(field, None)
        meta.update(uid=str(uuid.uuid4()), generation=1, creationTimestamp=_now())
        _fold_string_data(rtype, obj)
        obj.setdefault("apiVersion", rtype.group_version)
        obj.setdefault("kind", rtype.kind)
        self._validate(rtype, obj, None)
        meta.pop("managedFields", None)
        fields.record(None, obj, manager=_MANAGER.get(), subresource=None,
                      status_subresource=rtype.status_subresource, applied=applied)
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._objects[rtype.key][key] = obj
        await self._record(rtype, "ADDED", obj)
        return copy.deepcopy(obj)

    async def _update(self, rtype: ResourceType, namespace: str | None, name: str, new: Obj,
                      subresource: str | None, *, require_rv: bool = False, applied: Obj | None = None) -> Obj:
        current = self._get(rtype, namespace, name)
        new_meta = new.get("metadata") or {}
        wanted_rv = new_meta.get("resourceVersion")
        if require_rv and not wanted_rv and rtype.group:
            raise ApiError(422, "Invalid",
                           "metadata.resourceVersion: Invalid value: 0: must be specified for an update")
        if wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
            group = f"{rtype.plural}.{rtype.group}" if rtype.group else rtype.plural
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {group} "{name}": the object has '
                                            "been modified; please apply your changes to the latest version "
                                            "and try again")
        if new_meta.get("name", name) != name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the request")
        if subresource == "status":
            result = copy.deepcopy(current)
            if "status" in new:
                result["status"] = copy.deepcopy(new["status"])
            else:
                result.pop("status", None)
        else:
            result = copy.deepcopy(new)
            _fold_string_data(rtype, result)
            if rtype.status_subresource:
                if "status" in current:
                    result["status"] = copy.deepcopy(current["status"])
                else:
                    result.pop("status", None)
            meta = result.setdefault("metadata", {})
            for field in ("uid", "creationTimestamp", "namespace", "name", "generation",
                          "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
                if field in current["metadata"]:
                    meta[field] = current["metadata"][field]
                else:
                    meta.pop(field, None)
            if current["metadata"].get("deletionTimestamp"):
                added = set(meta.get("finalizers") or ()) - set(current["metadata"].get("finalizers") or ())
                if added:
                    raise ApiError(422, "Invalid", "metadata.finalizers: Forbidden: no new finalizers can be "
                                                   "added if the object is being deleted")
        result["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        result["apiVersion"], result["kind"] = current["apiVersion"], current["kind"]
        fields.record(current, result, manager=_MANAGER.get(), subresource=subresource,
                      status_subresource=rtype.status_subresource, applied=applied)
        if fields.without_times(result) == fields.without_times(current):
            # A no-op write changes nothing, not even the resourceVersion (an Apply that takes
            # ownership of fields is a change: managedFields change).
            return copy.deepcopy(current)

        def essence(o: Obj) -> Obj:
            return {k: v for k, v in o.items() if k not in ("metadata", "status", "apiVersion", "kind")}

        if essence(result) != essence(current):
            result["metadata"]["generation"] = int(current["metadata"].get("generation", 1)) + 1
        self._validate(rtype, result, current)
        result["metadata"]["resourceVersion"] = self._next_rv()
        key = (namespace or "", name) if rtype.namespaced else ("", name)
        if result["metadata"].get("deletionTimestamp") and not result["metadata"].get("finalizers"):
            del self._objects[rtype.key][key]
            await self._record(rtype, "DELETED", result)
        else:
            self._objects[rtype.key][key] = result
            await self._record(rtype, "MODIFIED", result)
        return copy.deepcopy(result)

    async def _patch(self, rtype: ResourceType, namespace: str | None, name: str, patch: Any,
                     content_type: str, subresource: str | None) -> Obj:
        current = self._get(rtype, namespace, name)
        if subresource == "scale":
            current = self._scale_of(rtype, current)  # a scale patch edits the Scale view
        if content_type == _MERGE or (content_type == _STRATEGIC and not rtype.group):
            # Core types would take a strategic merge; for the few fields tests touch it equals a merge.
            if not isinstance(patch, dict):
                raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
            new = merge_patch(copy.deepcopy(current), patch)
            # A resourceVersion in a merge patch is an optimistic-concurrency precondition.
            new.setdefault("metadata", {})
            if not (patch.get("metadata") or {}).get("resourceVersion"):
                new["metadata"].pop("resourceVersion", None)
        elif content_type == _JSON_PATCH:
            try:
                new = jsonpatch.apply_patch(current, patch)
            except jsonpatch.JsonPatchTestFailed as exc:
                raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our "
                                               f"request: {exc}") from exc
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise ApiError(422, "Invalid", str(exc)) from exc
            new.setdefault("metadata", {}).pop("resourceVersion", None)
        else:
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                                                        f"accepted media types include: {_JSON_PATCH}, {_MERGE}, "
                                                        f"{_APPLY}")
        if subresource == "scale":
            return self._scale_of(rtype, await self._set_scale(rtype, namespace, name, new))
        return await self._update(rtype, namespace, name, new, subresource)

    async def _apply(self, rtype: ResourceType, namespace: str | None, name: str, applied: Any,
                     subresource: str | None, *, force: bool) -> Obj:
        """Server-side apply by the current field manager: create, or merge with conflict checks."""
        if subresource is not None:
            raise ApiError(415, "UnsupportedMediaType", "server-side apply to a subresource is not emulated")
        if not isinstance(applied, dict):
            raise ApiError(400, "BadRequest", "an apply patch must be an object")
        current = self._objects[rtype.key].get((namespace or "", name) if rtype.namespaced else ("", name))
        if current is None:
            body = copy.deepcopy(applied)
            body.setdefault("metadata", {})["name"] = name
            return await self._create(rtype, namespace, body, applied=applied)
        conflicts = fields.apply_conflicts(current, applied, _MANAGER.get(),
                                           status_subresource=rtype.status_subresource)
        if conflicts and not force:
            version = current.get("apiVersion", rtype.group_version)
            causes = [{"reason": "FieldManagerConflict", "message": f'conflict with "{owner}" using {version}',
                       "field": "." + ".".join(path)} for path, owner in conflicts]
            count = f"{len(causes)} conflict{'s' if len(causes) > 1 else ''}"
            message = f"Apply failed with {count}: " + "; ".join(f"{c['message']}: {c['field']}" for c in causes)
            raise ApiError(409, "Conflict", message, {"name": name, "kind": rtype.plural, "causes": causes})
        new = fields.merge_applied(current, applied, _MANAGER.get(), status_subresource=rtype.status_subresource,
                                   force=force)
        wanted_rv = (applied.get("metadata") or {}).get("resourceVersion")
        new["metadata"]["resourceVersion"] = wanted_rv or current["metadata"]["resourceVersion"]
        return await self._update(rtype, namespace, name, new, None, applied=applied)

    async def _delete(self, rtype: ResourceType, namespace: str | None, name: str, options: Obj) -> Obj:
        current = self._get(rtype, namespace, name)
        preconditions = options.get("preconditions") or {}
        for field in ("resourceVersion", "uid"):
            if preconditions.get(field) and preconditions[field] != current["metadata"].get(field):
                raise ApiError(409, "Conflict", f"Precondition failed: {field} mismatch")
        key = (namespace or "", name) if rtype.namespaced else ("", name)
        if current["metadata"].get("finalizers"):
            if current["metadata"].get("deletionTimestamp"):
                return copy.deepcopy(current)
            result = copy.deepcopy(current)
            result["metadata"].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0,
                                      resourceVersion=self._next_rv())
            self._objects[rtype.key][key] = result
            await self._record(rtype, "MODIFIED", result)
            return copy.deepcopy(result)
        del self._objects[rtype.key][key]
        result = copy.deepcopy(current)
        result["metadata"]["resourceVersion"] = self._next_rv()
        await self._record(rtype, "DELETED", result)
        return result

    # --- scale ------------------------------------------------------------------------------------

    def _scale_of(self, rtype: ResourceType, obj: Obj) -> Obj:
        assert rtype.scale_paths is not None
        spec_path, status_path = rtype.scale_paths
        meta = obj["metadata"]
        return {
            "kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                         if k in meta},
            "spec": {"replicas": next(iter(jsonpath.evaluate(spec_path, obj)), 0)},
            "status": {"replicas": next(iter(jsonpath.evaluate(status_path, obj)), 0), "selector": ""},
        }

    async def _set_scale(self, rtype: ResourceType, namespace: str | None, name: str, scale: Obj) -> Obj:
        assert rtype.scale_paths is not None
        current = self._get(rtype, namespace, name)
        new = copy.deepcopy(current)
        target = new
        parts = rtype.scale_paths[0].strip(".").split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = (scale.get("spec") or {}).get("replicas", 0)
        rv = (scale.get("metadata") or {}).get("resourceVersion")
        new["metadata"]["resourceVersion"] = rv or current["metadata"]["resourceVersion"]
        return await self._update(rtype, namespace, name, new, None)

    # --- HTTP -------------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        attrs = attributes(request.method, path, request.query)
        user = ""
        try:
            if self.secure:
                identity = self._authenticate(request)
                user = identity.user
                if not self._authorizer.allowed(identity, attrs):
                    message, details = forbidden(identity, attrs)
                    raise ApiError(403, "Forbidden", message, details)
        except ApiError as exc:
            self.log.append(Logged(request.method, path, exc.code, content_type, user, attrs))
            return exc.response()
        for fault in self.faults:
            if fault.remaining > 0 and fault.method == request.method and fault.path.search(path):
                fault.remaining -= 1
                self.log.append(Logged(request.method, path, fault.code, content_type, user, attrs))
                return ApiError(fault.code, fault.reason, f"injected {fault.code}").response()
        request[_LOG_AS] = lambda status: Logged(request.method, path, status, content_type, user, attrs)
        try:
            response = await self._route(request)
        except ApiError as exc:
            response = exc.response()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            response = ApiError(400, "BadRequest", f"invalid JSON: {exc}").response()
        if not request.get(_LOGGED):
            self.log.append(Logged(request.method, path, response.status, content_type, user, attrs))
        return response

    async def _route(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if parts == ["version"]:
            return web.json_response({"major": "1", "minor": "34", "gitVersion": "v1.34.0-emulator",
                                      "platform": "linux/amd64"})
        if parts == ["api"]:
            return web.json_response({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
        if parts == ["apis"]:
            return web.json_response(self._group_list())
        if parts[:2] == ["openapi", "v3"]:
            return web.json_response(self._openapi_v3("/".join(parts[2:])))
        if parts and parts[0] == "api" and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts and parts[0] == "apis" and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        elif parts and parts[0] == "apis" and len(parts) == 2:
            return web.json_response(self._group(parts[1]))
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if not rest:
            return web.json_response(self._resource_list(group, version))
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        rtype = self.types.get((group, version, rest[0]))
        if rtype is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if rtype.namespaced and namespace is None and len(rest) > 1:
            raise ApiError(404, "NotFound", "a namespaced object needs a namespace")
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        if subresource not in (None, "status", "scale") or (
                subresource == "status" and not rtype.status_subresource) or (
                subresource == "scale" and rtype.scale_paths is None):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return await self._handle(request, rtype, namespace, name, subresource)

    async def _handle(self, request: web.Request, rtype: ResourceType, namespace: str | None,
                      name: str | None, subresource: str | None) -> web.StreamResponse:
        method = request.method
        _MANAGER.set(fields.manager_of(request.query.get("fieldManager"), request.headers.get("User-Agent", "")))
        wants_table = "as=Table" in request.headers.get("Accept", "")
        if name is None:
            if method == "GET":
                if request.query.get("watch") in ("true", "1", "True"):
                    return await self._watch(request, rtype, namespace)
                items = self._select(rtype, namespace, request.query)
                if wants_table:
                    return web.json_response(self._table(rtype, items))
                return web.json_response({
                    "kind": f"{rtype.kind}List", "apiVersion": rtype.group_version,
                    "metadata": {"resourceVersion": str(self._rv)}, "items": items})
            if method == "POST":
                created = await self._create(rtype, namespace, await request.json())
                return web.json_response(created, status=201)
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on a collection here")
        if method == "GET":
            obj = copy.deepcopy(self._get(rtype, namespace, name))
            if subresource == "scale":
                return web.json_response(self._scale_of(rtype, obj))
            if wants_table:
                return web.json_response(self._table(rtype, [obj]))
            return web.json_response(obj)
        if method == "PUT":
            body = await request.json()
            if subresource == "scale":
                return web.json_response(self._scale_of(rtype, await self._set_scale(rtype, namespace, name, body)))
            return web.json_response(await self._update(rtype, namespace, name, body, subresource, require_rv=True))
        if method == "PATCH":
            content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
            if content_type == _APPLY:
                if not request.query.get("fieldManager"):
                    raise ApiError(400, "BadRequest", "PATCH requests with apply content type require fieldManager")
                force = request.query.get("force") in ("true", "1")
                applied = yaml.safe_load(await request.text())
                key = (namespace or "", name) if rtype.namespaced else ("", name)
                status = 200 if key in self._objects[rtype.key] else 201  # apply creates a missing object
                return web.json_response(await self._apply(rtype, namespace, name, applied, subresource, force=force),
                                         status=status)
            patched = await self._patch(rtype, namespace, name, await request.json(), content_type, subresource)
            return web.json_response(patched)
        if method == "DELETE":
            options = await request.json() if request.can_read_body else {}
            return web.json_response(await self._delete(rtype, namespace, name, options or {}))
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")

    def _select(self, rtype: ResourceType, namespace: str | None, query: Any) -> list[Obj]:
        items = [copy.deepcopy(o) for (ns, _), o in sorted(self._objects[rtype.key].items())
                 if namespace is None or ns == namespace]
        if query.get("labelSelector"):
            items = [o for o in items if _matches_labels(o, query["labelSelector"])]
        if query.get("fieldSelector"):
            items = [o for o in items if _matches_fields(o, query["fieldSelector"])]
        return items

    async def _watch(self, request: web.Request, rtype: ResourceType, namespace: str | None) -> web.StreamResponse:
        query = request.query
        timeout = float(query.get("timeoutSeconds") or 1800)
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        since_text = query.get("resourceVersion") or "0"
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        self.log.append(request[_LOG_AS](200))  # type: ignore[operator]  # a watch is logged when it starts, not when it ends
        request[_LOGGED] = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        def visible(obj: Obj) -> bool:
            if namespace is not None and obj["metadata"].get("namespace") != namespace:
                return False
            if query.get("labelSelector") and not _matches_labels(obj, query["labelSelector"]):
                return False
            return not (query.get("fieldSelector") and not _matches_fields(obj, query["fieldSelector"]))

        async def send(event_type: str, obj: Obj) -> None:
            await response.write(json.dumps({"type": event_type, "object": obj}).encode() + b"\n")

        try:
            if since_text == "0":
                # No resourceVersion: synthetic ADDED events for the current state, then changes.
                since = self._rv
                for obj in self._select(rtype, namespace, query):
                    await send("ADDED", obj)
                if query.get("sendInitialEvents") == "true":
                    # WatchList (kubectl ≥1.32, client-go informers): mark the end of the initial state.
                    await send("BOOKMARK", {"kind": rtype.kind, "apiVersion": rtype.group_version, "metadata": {
                        "resourceVersion": str(since), "annotations": {"k8s.io/initial-events-end": "true"}}})
            else:
                since = int(since_text)
                if since < self._compacted[rtype.key]:
                    await send("ERROR", {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                         "reason": "Expired", "code": 410,
                                         "message": f"too old resource version: {since}"})
                    return response
            assert self._changed is not None
            epoch = self._watch_epoch
            while not self._stopping and epoch == self._watch_epoch and loop.time() < deadline:
                pending = [(rv, kind, obj) for rv, kind, obj in self._history[rtype.key] if rv > since]
                for rv, kind, obj in pending:
                    since = rv
                    if visible(obj):
                        await send(kind, obj)
                if pending:
                    continue
                async with self._changed:
                    try:
                        wait = min(self._bookmark_interval, max(0.0, deadline - loop.time()))
                        await asyncio.wait_for(self._changed.wait(), wait)
                    except TimeoutError:
                        if bookmarks:
                            await send("BOOKMARK", {"kind": rtype.kind, "apiVersion": rtype.group_version,
                                                    "metadata": {"resourceVersion": str(since)}})
        except (ConnectionResetError, asyncio.CancelledError):
            return response
        return response

    # --- discovery and tables --------------------------------------------------------------------

    def _groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for rtype in self.types.values():
            if rtype.group and rtype.version not in groups.setdefault(rtype.group, []):
                groups[rtype.group].append(rtype.version)
        return groups

    def _group(self, group: str) -> Obj:
        versions = self._groups().get(group)
        if not versions:
            raise ApiError(404, "NotFound", f"group {group} not found")
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": entries,
                "preferredVersion": entries[0]}

    def _group_list(self) -> Obj:
        return {"kind": "APIGroupList", "apiVersion": "v1",
                "groups": [self._group(group) for group in sorted(self._groups())]}

    def _resource_list(self, group: str, version: str) -> Obj:
        resources = [entry for rtype in self.types.values() if rtype.group == group and rtype.version == version
                     for entry in rtype.discovery_entries()]
        if not resources:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        group_version = f"{group}/{version}" if group else version
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
                "resources": resources}

    def _openapi_v3(self, group_version_path: str) -> Obj:
        """Just enough OpenAPI v3 for kubectl to see that PATCH takes `fieldValidation`.

        kubectl then leaves validation to the server (?fieldValidation=Strict), which is where the
        CRD schema and CEL rules are enforced; without this it insists on downloading OpenAPI v2.
        """
        by_path: dict[str, list[ResourceType]] = {}
        for rtype in self.types.values():
            prefix = f"apis/{rtype.group}/{rtype.version}" if rtype.group else f"api/{rtype.version}"
            by_path.setdefault(prefix, []).append(rtype)
        if not group_version_path:
            return {"paths": {p: {"serverRelativeURL": f"/openapi/v3/{p}"} for p in sorted(by_path)}}
        if group_version_path not in by_path:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        paths: dict[str, Any] = {}
        for rtype in by_path[group_version_path]:
            scope = "namespaces/{namespace}/" if rtype.namespaced else ""
            gvk = {"group": rtype.group, "version": rtype.version, "kind": rtype.kind}
            paths[f"/{group_version_path}/{scope}{rtype.plural}/{{name}}"] = {"patch": {
                "x-kubernetes-group-version-kind": gvk,
                "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
                "responses": {"200": {"description": "OK"}},
            }}
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes (emulated)", "version": "v1.34.0"},
                "paths": paths, "components": {"schemas": {}}}

    def _table(self, rtype: ResourceType, items: list[Obj]) -> Obj:
        columns = list(rtype.printer_columns) or [
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
        definitions = [{"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}]
        definitions += [{"name": c["name"], "type": c["type"], "format": c.get("format", ""),
                         "description": c.get("description", ""), "priority": c.get("priority", 0)}
                        for c in columns]
        rows = []
        for obj in items:
            cells: list[Any] = [obj["metadata"]["name"]]
            for column in columns:
                values = jsonpath.evaluate(column["jsonPath"], obj)
                value = values[0] if values else None
                if column["type"] == "date" and value is not None:
                    value = _human_age(str(value))
                cells.append(value)
            rows.append({"cells": cells, "object": {"kind": "PartialObjectMetadata",
                                                    "apiVersion": "meta.k8s.io/v1",
                                                    "metadata": obj["metadata"]}})
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1",
                "metadata": {"resourceVersion": str(self._rv)}, "columnDefinitions": definitions, "rows": rows}

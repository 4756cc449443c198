"""Ray Serve's REST API on the dashboard (`/api/serve/applications/`): apply a config, read progress.

The same API KubeRay uses to apply `serveConfigV2`, so embedded mode exercises the operator's real
output. Plain urllib: the operator package must not import `ray`, and this is three calls.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

APPLICATIONS_PATH = "/api/serve/applications/"

# Application states as Serve reports them (ray.serve.schema.ApplicationStatus).
RUNNING = "RUNNING"
DEPLOY_FAILED = "DEPLOY_FAILED"
UNHEALTHY = "UNHEALTHY"
_FAILED = frozenset({DEPLOY_FAILED, UNHEALTHY})


class ServeRestError(RuntimeError):
    """The dashboard refused a request or an application failed to deploy."""


@dataclass(frozen=True)
class AppProgress:
    """One application's state, and per deployment `running/target` replicas."""

    name: str
    status: str
    message: str
    deployments: dict[str, str]
    deployment_messages: dict[str, str] = field(default_factory=dict)  # e.g. a replica's constructor error

    @property
    def failed(self) -> bool:
        return self.status in _FAILED


def app_progress(details: Mapping[str, Any]) -> dict[str, AppProgress]:
    """Summarize a `GET /api/serve/applications/` body (pure; unknown shapes give empty fields)."""
    result: dict[str, AppProgress] = {}
    for name, app in (details.get("applications") or {}).items():
        deployments: dict[str, str] = {}
        messages: dict[str, str] = {}
        for dep_name, dep in (app.get("deployments") or {}).items():
            if dep.get("message"):
                messages[dep_name] = str(dep["message"])
            replicas = dep.get("replicas") or []
            running = sum(1 for r in replicas if r.get("state") == RUNNING)
            target = (dep.get("target_num_replicas") if "target_num_replicas" in dep else None)
            shown = f"{running}/{target}" if target is not None else f"{running}"
            deployments[dep_name] = f"{dep.get('status', '?')} {shown}"
        result[name] = AppProgress(
            name=name,
            status=str(app.get("status", "UNKNOWN")),
            message=str(app.get("message") or ""),
            deployments=deployments,
            deployment_messages=messages,
        )
    return result


def failure_text(app: AppProgress, limit: int = 2000) -> str:
    """An app's failure with its deployments' own messages (Serve's app message alone is terse)."""
    lines = [f"  {app.name}: {app.status}: {app.message}"]
    for name, message in sorted(app.deployment_messages.items()):
        text = message if len(message) <= limit else "..." + message[-limit:]  # the traceback's end says why
        lines.append(f"    {name}: " + text.replace("\n", "\n      "))
    return "\n".join(lines)


def all_running(progress: Mapping[str, AppProgress], expected: set[str]) -> bool:
    return expected <= set(progress) and all(progress[name].status == RUNNING for name in expected)


def progress_line(progress: Mapping[str, AppProgress], expected: set[str]) -> str:
    parts = []
    for name in sorted(expected):
        app = progress.get(name)
        parts.append(f"{name}: {app.status if app else 'PENDING'}")
    return ", ".join(parts)


class ServeRestClient:
    """Thin client of one dashboard; every method is a single HTTP call."""

    def __init__(self, dashboard_url: str, *, timeout: float = 30.0) -> None:
        self._url = dashboard_url.rstrip("/") + APPLICATIONS_PATH
        self._timeout = timeout

    def _call(self, method: str, body: Mapping[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self._url, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:2000]
            raise ServeRestError(f"{method} {self._url} answered {exc.code}: {detail}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ServeRestError(f"{method} {self._url} failed: {exc}") from exc
        return json.loads(raw) if raw.strip() else None

    def apply(self, config: Mapping[str, Any]) -> None:
        """Declaratively replace every application (apps missing from `config` are deleted)."""
        self._call("PUT", config)

    def details(self) -> dict[str, Any]:
        body = self._call("GET")
        return body if isinstance(body, dict) else {}

    def wait_running(
        self,
        expected: set[str],
        *,
        timeout: float,
        on_progress: Callable[[str], None] | None = None,
        poll: float = 1.0,
    ) -> dict[str, AppProgress]:
        """Poll until every `expected` app is RUNNING; raise on a failed app or at `timeout`."""
        deadline = time.monotonic() + timeout
        last_line = ""
        while True:
            progress = app_progress(self.details())
            failed = [progress[n] for n in expected if n in progress and progress[n].failed]
            if failed:
                lines = "\n".join(failure_text(a) for a in failed)
                raise ServeRestError(f"Serve applications failed to deploy:\n{lines}")
            if all_running(progress, expected):
                return progress
            line = progress_line(progress, expected)
            if on_progress is not None and line != last_line:
                on_progress(line)
                last_line = line
            if time.monotonic() > deadline:
                raise ServeRestError(f"applications not RUNNING after {timeout:.0f}s: {line}")
            time.sleep(poll)

"""Log lines as JSON objects (one per line) or plain text; shared by the operator and the runtime.

A JSON line has `time` (UTC, ISO 8601), `level`, `logger`, `message`, and the ids that matter when
they are known: `namespace`, `modeldeployment`, `ray_service`, `job_id`, `model`, `caller`
(the first 12 hex digits of the caller's key digest: enough to revoke, useless to authenticate),
plus `http_status`, `seconds`, `outcome` for a request. Ids come from `extra={...}` on a call or
from `log_context(...)` around a block (contextvars: safe across asyncio tasks). Kopf's per-object
loggers add the object as `k8s_ref`; it becomes `namespace`/`name`.

Never logged: API keys, request bodies or users' code (nothing here reads them; call sites pass
ids only, and a context id whose name looks like a secret, e.g. `api_key`, is written `[redacted]`).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

ID_FIELDS = ("namespace", "modeldeployment", "ray_service", "job_id", "model", "caller", "outcome",
             "http_status", "seconds", "bytes_in", "bytes_out")
_SECRET_WORDS = ("key", "token", "secret", "password", "authorization")

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("ndif_log_context", default={})  # noqa: B039


@contextlib.contextmanager
def log_context(**ids: Any) -> Iterator[None]:
    """Add ids to every record logged inside the block."""
    token = _context.set({**_context.get(), **{k: v for k, v in ids.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def _ids(record: logging.LogRecord) -> dict[str, Any]:
    found: dict[str, Any] = dict(_context.get())
    ref = getattr(record, "k8s_ref", None)
    if isinstance(ref, dict):
        found.setdefault("namespace", ref.get("namespace"))
        found.setdefault("name", ref.get("name"))
    for name in ID_FIELDS:
        value = getattr(record, name, None)
        if value is not None:
            found[name] = value
    return {k: ("[redacted]" if any(w in k.lower() for w in _SECRET_WORDS) else v)
            for k, v in found.items() if v is not None}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_ids(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message [id=value ...]` for people reading a terminal (local mode)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = _ids(record)
        return text + ("  " + " ".join(f"{k}={v}" for k, v in ids.items()) if ids else "")


def formatter(fmt: str) -> logging.Formatter:
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be json or text, not {fmt!r}")
    return JsonFormatter() if fmt == "json" else TextFormatter()


def setup(fmt: str = "json", level: str | int = "INFO", *, logger: str = "") -> None:
    """Send `logger` (default: the root) to stderr in `fmt`, replacing its handlers."""
    target = logging.getLogger(logger)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    target.handlers[:] = [handler]
    target.setLevel(level)
    if logger:
        target.propagate = False


def setup_runtime() -> None:
    """In a Ray Serve replica: our loggers (`model_runtime.*`) in NDIF_LOG_FORMAT (set on the Ray pods
    by the chart; unset: left to Ray's default handlers)."""
    fmt = os.environ.get("NDIF_LOG_FORMAT")
    if fmt in ("json", "text"):
        setup(fmt, os.environ.get("NDIF_LOG_LEVEL", "INFO"), logger="model_runtime")

"""JSON log lines with the ids that matter, never secrets; plain text when asked for."""

from __future__ import annotations

import io
import json
import logging

import pytest

from ndif_operator import logs


def _capture(fmt: str, emit: object) -> list[str]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.formatter(fmt))
    logger = logging.getLogger("ndif_operator.test_logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    emit(logger)  # type: ignore[operator]
    return stream.getvalue().splitlines()


def test_json_lines_carry_ids_from_extra_and_context() -> None:
    def emit(logger: logging.Logger) -> None:
        with logs.log_context(ray_service="ml/ndif", api_key="sk-live-123"):
            logger.info("patched %s", "ml/ndif", extra={"namespace": "ml", "modeldeployment": "llama"})
        logger.warning("kopf object", extra={"k8s_ref": {"namespace": "ml", "name": "gpt2"}})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("failed", extra={"job_id": "j1"})

    first, second, third = (json.loads(line) for line in _capture("json", emit)[:3])
    assert first["message"] == "patched ml/ndif" and first["level"] == "INFO"
    assert first["logger"] == "ndif_operator.test_logs" and first["time"].endswith("+00:00")
    assert (first["namespace"], first["modeldeployment"], first["ray_service"]) == ("ml", "llama", "ml/ndif")
    assert first["api_key"] == "[redacted]" and "sk-live-123" not in json.dumps(first)
    assert (second["namespace"], second["name"]) == ("ml", "gpt2") and "ray_service" not in second
    assert third["job_id"] == "j1" and "RuntimeError: boom" in third["exception"]


def test_text_lines_for_people() -> None:
    lines = _capture("text", lambda logger: logger.info("hello", extra={"model": "org/m"}))
    assert lines[0].endswith("INFO ndif_operator.test_logs: hello  model=org/m")


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="json or text"):
        logs.formatter("yaml")


def test_the_gateway_request_line_in_serve_json() -> None:
    """The gateway logs through Serve's logger; with logging_config.encoding JSON (rendered by the
    operator) Ray's JSON formatter writes our extra ids as keys."""
    from ray._common.formatters import JSONFormatter

    record = logging.LogRecord("ray.serve", logging.INFO, __file__, 1, "request %s on %s: %s",
                               ("j1", "org/m", "COMPLETED"), None)
    for key, value in {"job_id": "j1", "model": "org/m", "outcome": "COMPLETED", "caller": "0123456789ab",
                       "seconds": 0.5}.items():
        setattr(record, key, value)
    line = json.loads(JSONFormatter().format(record))
    assert line["message"] == "request j1 on org/m: COMPLETED"
    assert (line["job_id"], line["model"], line["caller"]) == ("j1", "org/m", "0123456789ab")

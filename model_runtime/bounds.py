"""Bounds on what a request sends back as text: error messages and its log lines.

Every text a request can make the server produce reaches the client and is kept by the gateway
(job records live an hour), so each is bounded where it is made: an error's text, each log line,
and a request's log in all (prints, warnings and anything else written to stdout/stderr).
"""

from __future__ import annotations

from collections.abc import Callable

#: What a client-visible error or traceback may grow to (the rest is cut, with a note).
MAX_ERROR_CHARS = 16 * 1024
#: One log line, and a request's whole log.
MAX_LOG_LINE_CHARS = 16 * 1024
MAX_LOG_BYTES = 1024 * 1024


def bounded(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`text`, cut to about `limit` characters (head and tail kept: the error type and the last frame)."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - limit:,} characters cut ...]\n{text[-half:]}"


class CappedLog:
    """A log sink that passes at most `max_bytes` of lines, then one note saying the rest was cut."""

    def __init__(self, sink: Callable[[str], None], max_bytes: int = MAX_LOG_BYTES) -> None:
        self._sink = sink
        self._left = max_bytes
        self._max = max_bytes

    def __call__(self, line: str) -> None:
        if self._left <= 0:
            return
        line = bounded(line, MAX_LOG_LINE_CHARS)
        self._left -= len(line.encode("utf-8", "replace")) + 1
        if self._left <= 0:
            line = f"[log truncated: this request's output passed {self._max:,} bytes]"
        self._sink(line)

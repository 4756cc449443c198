"""Request source under server-generated names, and what a client may see of it.

A request's block source and shipped functions arrive with file names the client chose. nnsight
reads source back by file name (`linecache`, `inspect.getsource`): its inner-block capture does,
and so does `.source`, which compiles a served module's `forward` with the stock compiler. If a
request's text were registered under a name it chose (say, the path of `modeling_llama.py`),
that text would be compiled outside the restricted compiler. So every piece of request source is
compiled and registered under a name this module makes up (`<request-7>`, `<request-7:helper>`),
never a client's; the client's name is kept only as text, to label the user's own frames in a
traceback.

`user_traceback(exc)` renders only frames whose code came from the request, labelled with the
client's names, and `scrub()` takes server paths out of the message; every text that leaves the
sandbox is bounded (`model_runtime.bounds`).
"""

from __future__ import annotations

import itertools
import linecache
import os
import re
import site
import sys
import sysconfig
import threading
import traceback
from dataclasses import dataclass, field

from model_runtime.bounds import bounded

#: A client-supplied file or function name as shown in a traceback.
_MAX_LABEL_CHARS = 200

_COUNTER = itertools.count(1)
_PREFIX = "<request-"


@dataclass
class RequestSources:
    """The source one request registered: server name → the client's label for it."""

    token: int = field(default_factory=lambda: next(_COUNTER))
    labels: dict[str, str] = field(default_factory=dict)

    def register(self, source: str, client_name: object, part: str | None = None) -> str:
        """Register `source` in linecache under a fresh server-made name and return the name."""
        name = f"{_PREFIX}{self.token}>" if part is None else f"{_PREFIX}{self.token}:{_label(part)}>"
        while name in self.labels:  # two shipped functions of one name
            name = name[:-1] + "'>"
        linecache.cache[name] = (len(source), None, source.splitlines(keepends=True), name)
        self.labels[name] = _label(client_name)
        return name


def is_request_name(filename: str) -> bool:
    return filename.startswith(_PREFIX)


_CURRENT = threading.local()


def current() -> RequestSources:
    """This thread's request sources (a fresh registry when none was begun)."""
    sources: RequestSources | None = getattr(_CURRENT, "sources", None)
    if sources is None:
        sources = begin()
    return sources


def begin() -> RequestSources:
    """Start a request's registry on this thread (the executor calls it per request)."""
    sources = RequestSources()
    _CURRENT.sources = sources
    return sources


def _label(name: object) -> str:
    text = str(name) if isinstance(name, str) else "<request>"
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= _MAX_LABEL_CHARS else "..." + text[-_MAX_LABEL_CHARS:]


def user_traceback(exc: BaseException) -> str:
    """The traceback a user sees: only frames of code their request shipped, by their names."""
    labels = current().labels
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename in labels]
    lines = []
    for frame in frames:
        lines.append(f'  File "{labels[frame.filename]}", line {frame.lineno}, in {_label(frame.name)}\n')
        text = linecache.getline(frame.filename, frame.lineno or 0).strip()
        if text:
            lines.append(f"    {text}\n")
    head = "Traceback (most recent call last):\n" + "".join(lines) if lines else ""
    tail = "".join(traceback.format_exception_only(type(exc), exc)).rstrip()
    return bounded(head + scrub(tail))


def _server_prefixes() -> list[str]:
    found = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.getcwd(), os.path.expanduser("~")}
    found.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    found.update(v for v in sysconfig.get_paths().values() if v)
    found.update(p for p in sys.path if p and os.path.isabs(p))
    # Longest first, so a site-packages path is replaced whole rather than by its prefix.
    return sorted((p.rstrip("/") for p in found if len(p) > 1), key=len, reverse=True)


_PATHS: re.Pattern[str] | None = None


def scrub(text: str) -> str:
    """Replace the server's file-system paths in `text` with `<server>`."""
    global _PATHS
    if _PATHS is None:
        _PATHS = re.compile("|".join(re.escape(p) for p in _server_prefixes()) + r"|/tmp/[^\s'\"]*")
    return _PATHS.sub("<server>", text)

"""API keys: accepted keys are configured as sha256 hex digests, never in clear.

The digests come from an environment variable (by default NDIF_API_KEY_HASHES, comma-separated)
and/or a directory with one digest per file: in Kubernetes a Secret mounted as a volume (chart value
`gateway.apiKeys.secret`). Kubelet rewrites a mounted Secret in place when it changes, and the
directory is re-read at most every `RELOAD_SECONDS`, so keys rotate without a restart; a directory
that cannot be read keeps the last digests read (a rotation never opens the gateway). With no
digests configured, authentication is off (a single-user local setup).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from pathlib import Path

from model_runtime.gateway.bounds import HttpError

log = logging.getLogger(__name__)

RELOAD_SECONDS = 10.0


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _clean(digests: set[str]) -> set[str]:
    return {d.strip().lower() for d in digests if d.strip()}


def _read_dir(directory: Path) -> set[str]:
    # Kubelet's atomic-writer layout: the keys are symlinks into `..data`; skip the dot entries.
    return {path.read_text() for path in directory.iterdir() if not path.name.startswith(".") and path.is_file()}


class ApiKeys:
    def __init__(self, digests: set[str], directory: str | Path | None = None) -> None:
        self._fixed = _clean(digests)
        self._directory = Path(directory) if directory else None
        self._from_dir: set[str] = set()
        self._loaded_at = float("-inf")
        self._digests = set(self._fixed)
        self._reload()

    @classmethod
    def from_env(cls, env_var: str, directory: str | Path | None = None) -> ApiKeys:
        return cls(set(os.environ.get(env_var, "").split(",")), directory)

    def _reload(self) -> None:
        if self._directory is None or time.monotonic() - self._loaded_at < RELOAD_SECONDS:
            return
        self._loaded_at = time.monotonic()
        try:
            fresh = _clean(_read_dir(self._directory))
        except OSError as exc:
            log.warning("API keys in %s unreadable, keeping the last ones: %s", self._directory, exc)
            return
        if fresh != self._from_dir:
            log.info("API keys reloaded from %s: %d digests", self._directory, len(fresh))
        self._from_dir = fresh
        self._digests = self._fixed | fresh

    @property
    def enabled(self) -> bool:
        # A configured directory means auth is wanted even while it is (momentarily) empty.
        return bool(self._digests) or self._directory is not None

    def check(self, key: str | None) -> str | None:
        """The key's digest if accepted (or "" when auth is off); None if refused."""
        self._reload()
        if not self.enabled:
            return ""
        if not key:
            return None
        digest = key_digest(key)
        # Constant-time against every configured digest: no early exit that leaks which one matched.
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(digest, known)
        return digest if matched else None

    def owner(self, key: str | None) -> str:
        """The caller's digest ("" when auth is off); a refused key is the HTTP 401."""
        owner = self.check(key)
        if owner is None:
            raise HttpError(401, "Missing or invalid API key (header ndif-api-key).")
        return owner

"""API keys: accepted keys are configured as sha256 hex digests, never in clear.

The digests come from an environment variable (by default NDIF_API_KEY_HASHES, comma-separated),
which in Kubernetes is filled from a Secret (`envFrom`/`valueFrom.secretKeyRef`). With no digests
configured, authentication is off (a single-user local setup).
"""

from __future__ import annotations

import hashlib
import hmac
import os


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    def __init__(self, digests: set[str]) -> None:
        self._digests = {d.strip().lower() for d in digests if d.strip()}

    @classmethod
    def from_env(cls, env_var: str) -> ApiKeys:
        return cls(set(os.environ.get(env_var, "").split(",")))

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, key: str | None) -> str | None:
        """The key's digest if accepted (or "" when auth is off); None if refused."""
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

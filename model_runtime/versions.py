"""The minimum client version gate (`nnsight-version` header on `POST /request`)."""

from __future__ import annotations

from packaging.version import InvalidVersion, Version


def version_refusal(client_version: str | None, minimum: str) -> str | None:
    """A message for the client when its nnsight is missing/unparsable/too old; None when fine."""
    upgrade = f"Upgrade with `pip install -U 'nnsight>={minimum}'`."
    if not client_version:
        return f"This server needs nnsight >= {minimum}, but the request has no nnsight-version. {upgrade}"
    try:
        parsed = Version(client_version)
    except InvalidVersion:
        return f"Unrecognised nnsight version {client_version!r}; this server needs >= {minimum}. {upgrade}"
    if parsed < Version(minimum):
        return f"nnsight {client_version} is older than this server's minimum {minimum}. {upgrade}"
    return None

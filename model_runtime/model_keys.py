"""Routing keys: an nnsight client's model key → the lower-cased repo id the gateway routes by."""

from __future__ import annotations

import json

_CLIENT_CLASS = "nnsight.modeling.transformers.TransformersModel"


def repo_key(model_key: str) -> str:
    """`"<import.path>:{json with repo_id}"` (what nnsight 0.8 sends) or a bare repo id → route key.

    Raises ValueError with a readable message for anything else.
    """
    _, sep, tail = model_key.partition(":")
    if sep and tail.lstrip().startswith("{"):
        try:
            fields = json.loads(tail)
        except json.JSONDecodeError as exc:
            raise ValueError(f"model key {model_key!r} has unreadable JSON after ':' ({exc})") from None
        repo_id = fields.get("repo_id") if isinstance(fields, dict) else None
        if not isinstance(repo_id, str) or not repo_id:
            raise ValueError(f"model key {model_key!r} has no repo_id")
        return repo_id.lower()
    if not model_key.strip():
        raise ValueError("empty model key")
    return model_key.strip().lower()


def requested_revision(model_key: str) -> str | None:
    """The revision a client key asks for; None for "whatever is served" (null or "main")."""
    _, sep, tail = model_key.partition(":")
    if not (sep and tail.lstrip().startswith("{")):
        return None
    try:
        fields = json.loads(tail)
    except json.JSONDecodeError:
        return None
    revision = fields.get("revision") if isinstance(fields, dict) else None
    return None if revision in (None, "", "main") else str(revision)


def client_model_key(repo_id: str, revision: str | None, trust_remote_code: bool) -> str:
    """The key an nnsight 0.8 client builds for `TransformersModel(repo_id)` (for /status)."""
    fields: dict[str, object] = {"repo_id": repo_id, "revision": None if revision == "main" else revision}
    if trust_remote_code:
        fields["trust_remote_code"] = True
    fields["task"] = "text-generation"
    return f"{_CLIENT_CLASS}:{json.dumps(fields)}"

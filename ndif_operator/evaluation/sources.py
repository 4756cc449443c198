"""Where checkpoint files are read from: a local directory, the HF cache, S3, or the Hub.

Each source lists file names and reads byte ranges, so that the evaluator fetches only what it
needs (config.json, the shard index, safetensors headers) and never a tensor. boto3 and
huggingface_hub are imported lazily: the operator pays for them only when a model needs them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ndif_operator.api import ModelSpec
from ndif_operator.evaluation.errors import EstimateError


@dataclass(frozen=True, slots=True)
class SourceCredentials:
    """What the source's Secret holds: a Hub token, or S3 keys (as the AWS environment names them)."""

    hf_token: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None

    @classmethod
    def from_secret(cls, data: Mapping[str, str]) -> SourceCredentials:
        """A decoded Secret: key `token` (Hub) and/or `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
        `AWS_SESSION_TOKEN` (S3, the names the meta-device Job gets through `envFrom`)."""
        return cls(hf_token=data.get("token") or None, aws_access_key_id=data.get("AWS_ACCESS_KEY_ID") or None,
                   aws_secret_access_key=data.get("AWS_SECRET_ACCESS_KEY") or None,
                   aws_session_token=data.get("AWS_SESSION_TOKEN") or None)

    def s3_client_kwargs(self) -> dict[str, str]:
        """boto3 keyword arguments; empty means boto3's own chain (the pod's identity)."""
        if not (self.aws_access_key_id and self.aws_secret_access_key):
            return {}
        kwargs = {"aws_access_key_id": self.aws_access_key_id, "aws_secret_access_key": self.aws_secret_access_key}
        if self.aws_session_token:
            kwargs["aws_session_token"] = self.aws_session_token
        return kwargs


class CheckpointFiles(Protocol):
    description: str

    def names(self) -> list[str]:
        """File names relative to the checkpoint root (top level only), sorted."""
        ...

    def read(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        """Bytes [start, start + length) of a file (to its end when length is None)."""
        ...


class LocalFiles:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = str(root)

    def names(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir() if p.is_file())
        except OSError as exc:
            raise EstimateError(f"cannot list {self.root}: {exc.strerror or exc}") from exc

    def read(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        try:
            with (self.root / name).open("rb") as fh:
                fh.seek(start)
                return fh.read() if length is None else fh.read(length)
        except OSError as exc:
            raise EstimateError(f"cannot read {self.root / name}: {exc.strerror or exc}") from exc


class S3Files:
    """Objects under `s3://bucket/prefix/`; headers come through ranged GETs."""

    def __init__(self, client: Any, bucket: str, prefix: str) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.description = f"s3://{bucket}/{self.prefix}"

    def names(self) -> list[str]:
        names: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = str(obj["Key"])[len(self.prefix) :]
                    if rel and "/" not in rel:
                        names.append(rel)
        except Exception as exc:  # botocore raises many types; all mean "cannot list"
            raise EstimateError(f"cannot list {self.description}: {exc}") from exc
        return sorted(names)

    def read(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.prefix + name}
        if start or length is not None:
            end = "" if length is None else str(start + length - 1)
            kwargs["Range"] = f"bytes={start}-{end}"
        try:
            body = self.client.get_object(**kwargs)["Body"]
            data: bytes = body.read()
            return data
        except Exception as exc:
            raise EstimateError(f"cannot read {self.description}{name}: {exc}") from exc


class HubFiles:
    """A Hub repository at one revision, read over HTTP (only when online).

    Two Hub endpoints are used: `/api/models/<repo>/revision/<rev>` lists the files, and
    `/<repo>/resolve/<rev>/<file>` serves a file, honouring `Range` (redirects to the CDN are
    followed), so headers are read exactly as from S3.
    """

    def __init__(self, repo_id: str, revision: str, endpoint: str | None, token: str | None) -> None:
        self.repo_id, self.revision, self.token = repo_id, revision, token
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        self.description = f"{self.endpoint}/{repo_id}@{revision}"

    def _get(self, url: str, headers: dict[str, str]) -> bytes:
        import httpx

        if self.token:
            headers = {**headers, "Authorization": f"Bearer {self.token}"}
        try:
            response = httpx.get(url, headers=headers, follow_redirects=True, timeout=30.0)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise EstimateError(f"cannot read {url}: {exc}") from exc
        return response.content

    def names(self) -> list[str]:
        from urllib.parse import quote

        url = f"{self.endpoint}/api/models/{self.repo_id}/revision/{quote(self.revision, safe='')}"
        try:
            siblings = json.loads(self._get(url, {}))["siblings"]
            files = [str(s["rfilename"]) for s in siblings]
        except (ValueError, KeyError, TypeError) as exc:
            raise EstimateError(f"unexpected answer listing {self.description}: {exc}") from exc
        return sorted(f for f in files if "/" not in f)

    def read(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        from urllib.parse import quote

        headers = {}
        if start or length is not None:
            headers["Range"] = f"bytes={start}-{'' if length is None else start + length - 1}"
        url = f"{self.endpoint}/{self.repo_id}/resolve/{quote(self.revision, safe='')}/{quote(name)}"
        return self._get(url, headers)


def hf_cache_snapshot(repo_id: str, revision: str, cache_dir: Path | None = None) -> Path | None:
    """The snapshot directory of `repo_id@revision` in a Hugging Face cache, if present."""
    if cache_dir is None:
        env = os.environ.get("HF_HUB_CACHE")
        home = os.environ.get("HF_HOME")
        cache_dir = Path(env) if env else Path(home) / "hub" if home else Path.home() / ".cache/huggingface/hub"
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def open_checkpoint(
    model: ModelSpec, *, s3_client: Any | None = None, hf_token: str | None = None,
    credentials: SourceCredentials | None = None,
) -> CheckpointFiles:
    """The files of `model`'s checkpoint, from its declared source (`credentials` from its Secret)."""
    src = model.source
    credentials = credentials or SourceCredentials()
    hf_token = credentials.hf_token or hf_token
    if src.local_path is not None:
        root = Path(src.local_path.path)
        if not root.is_dir():
            raise EstimateError(f"local path {root} is not a directory on the operator's node")
        return LocalFiles(root)
    if src.s3 is not None:
        if s3_client is None:
            import boto3

            s3_client = boto3.client("s3", endpoint_url=src.s3.endpoint_url, region_name=src.s3.region,
                                     **credentials.s3_client_kwargs())
        return S3Files(s3_client, src.s3.bucket, src.s3.prefix)
    snapshot = hf_cache_snapshot(model.repo_id, model.revision)
    if snapshot is not None:
        return LocalFiles(snapshot)
    if _hub_offline():
        raise EstimateError(
            f"{model.repo_id}@{model.revision} is not in the Hugging Face cache and the Hub is offline"
            " (HF_HUB_OFFLINE); add it to the evaluator cache or use a localPath / s3 source"
        )
    endpoint = src.hugging_face.endpoint if src.hugging_face is not None else None
    return HubFiles(model.repo_id, model.revision, endpoint, hf_token)

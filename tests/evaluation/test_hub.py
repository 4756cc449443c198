"""The Hub source against a local HTTP server that speaks the two Hub endpoints the evaluator uses."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ndif_operator.api import DType, HuggingFaceSource, LocalPathSource, ModelSource, ModelSpec, RuntimeLimits
from ndif_operator.evaluation import EstimateError, estimate

LIMITS = RuntimeLimits(max_batch_size=2, max_sequence_length=64)


class FakeHub:
    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.sent: list[int] = []
        self.auth: list[str | None] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                hub.auth.append(self.headers.get("Authorization"))
                parts = self.path.strip("/").split("/")
                if parts[:2] == ["api", "models"]:
                    repo = "/".join(parts[2:4])
                    if repo not in hub.repos:
                        return self._reply(404, b"{}")
                    files = [{"rfilename": p.name} for p in sorted(hub.repos[repo].iterdir())]
                    return self._reply(200, json.dumps({"siblings": files}).encode())
                repo, _resolve, _rev, name = "/".join(parts[:2]), *parts[2:]
                data = (hub.repos[repo] / name).read_bytes()
                rng = self.headers.get("Range")
                if rng:
                    start_s, end_s = rng.removeprefix("bytes=").split("-")
                    end = min(int(end_s), len(data) - 1) if end_s else len(data) - 1
                    return self._reply(206, data[int(start_s) : end + 1])
                return self._reply(200, data)

            def _reply(self, code: int, body: bytes) -> None:
                hub.sent.append(len(body))
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture(scope="module")
def hub(tiny_models: dict[str, Path]) -> Iterator[FakeHub]:
    fake = FakeHub({"tiny/llama-sharded": tiny_models["llama-sharded"]})
    thread = threading.Thread(target=fake.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()
        thread.join(timeout=5)


def test_hub_source_reads_headers_over_http(
    hub: FakeHub, tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: the Hub must be asked
    model = ModelSpec(repo_id="tiny/llama-sharded", dtype=DType.BFLOAT16,
                      source=ModelSource(hugging_face=HuggingFaceSource(endpoint=hub.url)))
    hub.sent.clear()
    remote = estimate(model, LIMITS, hf_token="secret")
    local = estimate(ModelSpec(repo_id="x/y", dtype=DType.BFLOAT16, source=ModelSource(
        local_path=LocalPathSource(path=str(tiny_models["llama-sharded"])))), LIMITS)
    assert remote.weights_bytes == local.weights_bytes
    assert set(hub.auth[-len(hub.sent):]) == {"Bearer secret"}
    shards = len(list(tiny_models["llama-sharded"].glob("*.safetensors")))
    assert len(hub.sent) == 1 + 2 + shards  # listing, config + index, one ranged read per shard
    with pytest.raises(EstimateError, match="cannot read"):
        estimate(ModelSpec(repo_id="tiny/absent", source=ModelSource(
            hugging_face=HuggingFaceSource(endpoint=hub.url))), LIMITS)


def test_the_secrets_credentials_reach_the_hub_and_s3(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the operator reads from `tokenSecret` / `credentialsSecret` is what the reads send."""
    from ndif_operator.api import S3Source
    from ndif_operator.evaluation import SourceCredentials
    from ndif_operator.evaluation.sources import open_checkpoint

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    model = ModelSpec(repo_id="tiny/llama-sharded", dtype=DType.BFLOAT16,
                      source=ModelSource(hugging_face=HuggingFaceSource(endpoint=hub.url, token_secret="hf")))
    estimate(model, LIMITS, credentials=SourceCredentials.from_secret({"token": "from-secret"}))
    assert hub.auth[-1] == "Bearer from-secret"
    made: list[dict[str, object]] = []
    import boto3

    monkeypatch.setattr(boto3, "client", lambda service, **kwargs: made.append(kwargs) or object())
    s3 = ModelSpec(repo_id="org/m", source=ModelSource(s3=S3Source(bucket="models", credentials_secret="s3")))
    secret = {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "shh", "AWS_SESSION_TOKEN": "tok"}
    open_checkpoint(s3, credentials=SourceCredentials.from_secret(secret))
    open_checkpoint(s3)  # no Secret: boto3's own chain (the pod's identity)
    assert made[0] == {"endpoint_url": None, "region_name": None, "aws_access_key_id": "AKIA",
                       "aws_secret_access_key": "shh", "aws_session_token": "tok"}
    assert made[1] == {"endpoint_url": None, "region_name": None}

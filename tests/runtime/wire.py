"""Raw nnsight-protocol helpers for tests that must send what the real client never would."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

NNSIGHT_VERSION = "0.8.1"
API_KEY = "test-key-123"
VICTIM_KEY = "victim-key-456"  # a second user of the strict gateway (tests/runtime/test_two_keys.py)
API_KEY_HASHES_ENV = "NDIF_TEST_API_KEY_HASHES"
RESULTS_BUCKET = "ndif-results"


def capture_blob(model: Any, prompt: str, *, compress: bool = True) -> tuple[str, bytes]:
    """A real client payload (and its model key) for `model.lm_head.output.save()` on `prompt`."""
    from nnsight.schema.request import RequestModel
    from nnsight.tracing.backend import Backend

    captured: dict[str, bytes] = {}

    class Capture(Backend):
        def __call__(self, tracer: Any) -> None:
            captured["blob"] = RequestModel.serialize(tracer, compress=compress)

    with model.trace(prompt, backend=Capture()):
        logits = model.lm_head.output.save()  # noqa: F841 (saved by name)
    return model.to_model_key(), captured["blob"]


def post(
    url: str,
    model_key: str,
    blob: bytes,
    *,
    compress: bool = True,
    headers: dict[str, str] | None = None,
    session_id: str = "",
) -> httpx.Response:
    envelope = {"model_key": model_key, "session_id": session_id, "compress": compress, "env": {}}
    all_headers = {"nnsight-version": NNSIGHT_VERSION, **(headers or {})}
    return httpx.post(
        f"{url}/request",
        data={"data": json.dumps(envelope)},
        files={"blob": ("request", blob, "application/octet-stream")},
        headers=all_headers,
        timeout=60,
    )


def wait_final(url: str, job_id: str, headers: dict[str, str] | None = None, timeout: float = 60) -> dict[str, Any]:
    """Poll `/response/{id}` until COMPLETED or ERROR."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(f"{url}/response/{job_id}", headers=headers, timeout=30)
        if response.status_code == 200:
            body: dict[str, Any] = response.json()
            if body["status"] in ("COMPLETED", "ERROR"):
                return body
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")


def poll_backend(backend: Any, timeout: float = 30) -> Any:
    """Call a non-blocking nnsight backend until its job finished; its result (None on timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = backend()
        if result is not None:
            return result
        time.sleep(0.1)
    return None


def submit_sleeper(model: Any, prompt: str, seconds: float) -> Any:
    """A non-blocking job that holds its model's lock for about `seconds`; its backend (poll it)."""
    with model.trace(prompt, remote=True, blocking=False) as tracer:
        model.model.layers[0].output.save()
        for _ in range(round(seconds * 10)):
            time.sleep(0.1)
    return tracer.backend


def fetch_result(url: str) -> dict[str, Any]:
    """Download a COMPLETED job's result URL and load it as the client would (zstd + torch.load)."""
    import io

    import torch
    import zstandard

    content = httpx.get(url, timeout=60).content
    loaded: dict[str, Any] = torch.load(
        io.BytesIO(zstandard.ZstdDecompressor().decompress(content)), map_location="cpu", weights_only=False
    )
    return loaded


class InfluxSink:
    """An InfluxDB v2 write endpoint on loopback that records what it is sent: (Authorization
    header, path and line-protocol body). Use as a context manager; `url` while it runs."""

    def __init__(self) -> None:
        import http.server

        writes: list[tuple[str, str]] = []
        self.writes = writes

        class Write(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                import gzip

                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    raw = gzip.decompress(raw)
                writes.append((self.headers.get("Authorization", ""), self.path + "\n" + raw.decode()))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Write)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def text(self) -> str:
        return "\n".join(body for _, body in self.writes)

    def __enter__(self) -> InfluxSink:
        import threading

        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

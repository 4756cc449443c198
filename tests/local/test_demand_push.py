"""Local mode hears of demand at once (the gateway's `/demand` long-poll, against a real HTTP server)
and sizes Ray's object store for the weight store."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ndif_operator.local.activation import DemandWatcher, wait_for_demand


class FakeGateway:
    """`GET /demand?since=N&timeout=S` as the gateway answers it: at once when seq > N, else when a
    demand is recorded (or at the timeout)."""

    def __init__(self) -> None:
        self.seq = 0
        self.changed = threading.Condition()
        self.keys: list[str | None] = []

    def record(self) -> None:
        with self.changed:
            self.seq += 1
            self.changed.notify_all()

    def body(self) -> dict[str, object]:
        return {"seq": self.seq, "deployments": {"m": {
            "deployment": "ns/warm", "activation_requested": True, "activation_requested_at": 1.0e9}}}


@pytest.fixture
def gateway() -> Iterator[tuple[str, FakeGateway]]:
    fake = FakeGateway()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
            since, timeout = int(query["since"][0]), float(query["timeout"][0])
            fake.keys.append(self.headers.get("ndif-api-key"))
            with fake.changed:
                fake.changed.wait_for(lambda: fake.seq > since, timeout)
            data = json.dumps(fake.body()).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", fake
    finally:
        server.shutdown()


def test_wait_for_demand_returns_when_a_demand_arrives(gateway: tuple[str, FakeGateway]) -> None:
    url, fake = gateway
    assert wait_for_demand(url, "k", -1, timeout_s=5) is not None  # learns the counter at once
    threading.Timer(0.3, fake.record).start()
    started = time.monotonic()
    answer = wait_for_demand(url, "k", 0, timeout_s=20)
    assert answer is not None and time.monotonic() - started < 5  # pushed, not the 20 s timeout
    seq, demands = answer
    assert seq == 1 and demands["ns/warm"].requested
    assert fake.keys == ["k", "k"]
    assert wait_for_demand("http://127.0.0.1:9", None, 0, timeout_s=1) is None  # unreachable: no demand


def test_watcher_hands_over_each_new_demand_once(gateway: tuple[str, FakeGateway]) -> None:
    url, fake = gateway
    watcher = DemandWatcher(url).start()
    try:
        assert watcher.wait(0.5) is None  # nothing requested yet
        fake.record()
        pushed = watcher.wait(10)
        assert pushed is not None and pushed["ns/warm"].requested
        assert watcher.wait(0.3) is None  # handed over once
    finally:
        watcher.stop()
        fake.record()  # wake the pending long-poll so the thread sees the stop


def test_object_store_holds_the_planned_host_copies(tmp_path: Path) -> None:
    """The node's weight store lives in Ray's object store: local mode sizes it from the plan."""
    from model_runtime.tiny_models import build_tiny_model
    from ndif_operator.api.v1alpha1 import GIB
    from ndif_operator.local.embedded import object_store_bytes
    from ndif_operator.local.inventory import Machine, build_inventory
    from ndif_operator.local.manifests import parse_manifests
    from ndif_operator.local.pipeline import plan_local
    from ndif_operator.local.ray_head import RayHeadSpec

    path = build_tiny_model("llama", tmp_path / "tiny")
    manifest = ("apiVersion: ndif.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: {name}}}\n"
                "spec: {{model: {{repoId: x/{name}, source: {{localPath: {{path: {path}}}}}}}, level: {level}}}\n")
    text = "---\n".join(manifest.format(name=n, path=path, level=lvl) for n, lvl in
                        (("hot", "Hot"), ("warm", "Warm"), ("cold", "Cold")))
    planned = plan_local(parse_manifests(text, "m.yaml"), build_inventory(Machine((), 16 * GIB)), serve_port=8123)
    weights = planned.estimates["default/hot"].weights_bytes
    assert object_store_bytes(planned) == RayHeadSpec.object_store_bytes + (2 * weights) * 5 // 4  # not the cold one
    assert object_store_bytes(None) == RayHeadSpec.object_store_bytes

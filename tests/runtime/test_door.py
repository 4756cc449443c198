"""The gateway door's hand-over between two replicas on one port (`gateway/door.py`), in-process:
a dict stands in for Ray's internal KV store (the door's only use of Ray), and the watch's
fallback period is longer than the test waits, so only the successor's notice can hand over."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from loopback import free_port

from model_runtime.gateway import door


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def _no_successor() -> bool:
    return False


class FakeKv:
    def __init__(self) -> None:
        self.store: dict[bytes, bytes] = {}
        self.reads = 0

    def get(self, key: bytes, namespace: str | None = None) -> bytes | None:
        self.reads += 1
        return self.store.get(key)

    def put(self, key: bytes, value: bytes, overwrite: bool = True, namespace: str | None = None) -> None:
        self.store[key] = value

    def delete(self, key: bytes, namespace: str | None = None) -> None:
        self.store.pop(key, None)


@pytest.fixture()
def kv(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKv]:
    from ray.experimental import internal_kv

    fake = FakeKv()
    monkeypatch.setattr(internal_kv, "_internal_kv_get", fake.get)
    monkeypatch.setattr(internal_kv, "_internal_kv_put", fake.put)
    monkeypatch.setattr(internal_kv, "_internal_kv_del", fake.delete)
    monkeypatch.setattr(door, "WATCH_S", 60.0)
    yield fake


def _wait(condition: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


class _Replica:
    def __init__(self, port: int, owner: str) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.door = door.Door(_app, "127.0.0.1", port, owner=owner, node_id="node", loop=self.loop,
                              busy=lambda: False, succeeded=_no_successor)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.door.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_a_successor_takes_the_door_at_once_by_notice(kv: FakeKv) -> None:
    port = free_port()
    key = door.door_key("node", port)
    old, new = _Replica(port, "old"), _Replica(port, "new")
    try:
        old.door.open()
        _wait(lambda: kv.store.get(key) == b"old", "the first replica took the door")
        # Forged notices (anyone on the host can send one) change nothing and cost at most one
        # read of the key per NOTICE_GAP_S.
        reads, started = kv.reads, time.monotonic()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            for _ in range(200):
                sock.sendto(b"taken", door.notice_address(key, "old"))
        _wait(lambda: kv.reads > reads, "the notices read the key")
        time.sleep(2 * door.NOTICE_GAP_S)
        assert old.door.listening
        assert kv.reads - reads <= 2 + (time.monotonic() - started) / door.NOTICE_GAP_S
        # The successor listens on the same port, takes the door and tells the old owner, which
        # stops listening long before its 60 s fallback read.
        new.door.open()
        _wait(lambda: new.door.listening, "the successor listening")
        _wait(lambda: not old.door.listening, "the old replica let go of the door", timeout=10.0)
        assert kv.store[key] == b"new"
    finally:
        old.close()
        new.close()
    assert key not in kv.store  # the last owner released it

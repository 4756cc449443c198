"""The direct channel between the gateway and a model replica on real Ray Serve: the unmodified
nnsight client through the gateway's own listener reaches the replica over it, refusals (WARM, a
full queue) come through it as through Serve, and the replica's server refuses a wrong token and
an oversize frame without running anything. The units: tests/runtime/test_channel.py."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from typing import Any

import nnsight
import pytest
import torch
from nnsight.intervention.backends.remote import RemoteError

from model_runtime.channel_wire import FRAME_MARGIN_BYTES, HEADER, encode
from runtime.conftest_names import MODEL_APP, SLOW_APP
from runtime.wire import poll_backend, submit_sleeper

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPT = "The Eiffel Tower is in the city of"


def _timings(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/timings", timeout=30) as response:
        return dict(json.loads(response.read()))


def _latest_via(url: str) -> str:
    jobs = _timings(url)["jobs"]
    return str(list(jobs.values())[-1]["via"])  # insertion order: the last completed job


def _trace(model: Any) -> torch.Tensor:
    with model.trace(PROMPT, remote=True):
        logits = model.lm_head.output.save()
    return logits


def _until_channel(model: Any, url: str) -> torch.Tensor:
    """Trace until a job took the channel (it is learned in the background after the app's first request)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        logits = _trace(model)
        if _latest_via(url) == "channel":
            return logits
        time.sleep(0.2)
    raise AssertionError(f"no job took the direct channel: {_timings(url)['paths']}")


def test_the_client_through_the_gateways_listener_takes_the_channel(
    served: dict[str, Any], client_model: Any, local_model: Any
) -> None:
    door = served["door_url"]
    nnsight.CONFIG.API.HOST = door
    try:
        _until_channel(client_model, door)
        before = _timings(door)["paths"]
        logits = _trace(client_model)
        with client_model.trace(PROMPT, remote=True):
            client_model.model.layers[1].mlp.output[:] = 0
            patched = client_model.lm_head.output.save()
        after = _timings(door)["paths"]
    finally:
        nnsight.CONFIG.API.HOST = served["url"]
    assert after["channel"] == before["channel"] + 2 and after.get("serve", 0) == before.get("serve", 0)
    assert _latest_via(served["url"]) == "channel"  # one gateway behind both doors
    with local_model.trace(PROMPT):
        ref = local_model.lm_head.output.save()
    with local_model.trace(PROMPT):
        local_model.model.layers[1].mlp.output[:] = 0
        ref_patched = local_model.lm_head.output.save()
    assert torch.equal(logits, ref) and torch.equal(patched, ref_patched)


def test_warm_and_full_queue_refusals_come_through_the_channel(slow_client_model: Any, served: dict[str, Any]) -> None:
    from ray import serve

    url = served["url"]
    handle = serve.get_app_handle(SLOW_APP)
    _until_channel(slow_client_model, url)
    before = _timings(url)["paths"]
    handle.set_level.remote("Warm").result()
    try:
        with pytest.raises(RemoteError, match=r"WARM.*activation to HOT was requested"):
            _trace(slow_client_model)
    finally:
        handle.activate.remote().result()

    running = submit_sleeper(slow_client_model, PROMPT, 1.5)
    time.sleep(0.5)
    queued = submit_sleeper(slow_client_model, PROMPT, 1.5)  # the queue (max_queue_depth 1) is full now
    with pytest.raises(RemoteError, match=r"queue.*full"):
        submit_sleeper(slow_client_model, PROMPT, 1.5)
    for backend in (running, queued):
        assert poll_backend(backend) is not None, "an admitted job never finished"
    after = _timings(url)["paths"]
    # WARM refusal, two admitted sleepers and the full queue's refusal: all over the channel.
    assert after["channel"] - before["channel"] == 4 and after.get("serve", 0) == before.get("serve", 0)
    assert after.get("fallback", 0) == before.get("fallback", 0)


def _channel_info() -> dict[str, Any]:
    from ray import serve

    return dict(serve.get_app_handle(MODEL_APP).channel.remote().result())


def _requests_seen() -> int:
    from ray import serve

    metrics = serve.get_app_handle(MODEL_APP).info.remote().result()["metrics"]
    return sum(v for k, v in metrics.items() if k.startswith("requests_"))


async def _closed_without_answer(info: dict[str, Any], first: bytes, then: list[bytes]) -> bool:
    reader, writer = await asyncio.open_connection(info["host"], info["port"])
    try:
        writer.write(first)
        writer.writelines(then)
        return await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()


def test_the_replicas_channel_refuses_a_wrong_token_and_an_oversize_frame(served: dict[str, Any]) -> None:
    from ray import serve

    info = _channel_info()
    assert len(info["token"]) == 32 and info["port"] > 0
    before, depth = _requests_seen(), serve.get_app_handle(MODEL_APP).info.remote().result()["queue_depth"]
    request = encode({"job_id": "x", "envelope": {"model_key": str(served["path"]).lower()}, "blob": b"",
                      "inline_max": 0})
    wrong = bytes(b ^ 1 for b in info["token"])
    assert asyncio.run(_closed_without_answer(info, wrong, request))
    limit = serve.get_app_handle(MODEL_APP).info.remote().result()["max_payload_bytes"]
    oversize = [HEADER.pack(limit + FRAME_MARGIN_BYTES + 1)]
    assert asyncio.run(_closed_without_answer(info, info["token"], oversize))
    assert _requests_seen() == before  # nothing was admitted, refused or run
    assert serve.get_app_handle(MODEL_APP).info.remote().result()["queue_depth"] == depth

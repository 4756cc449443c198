"""Timeout, backpressure, WARM/COLD activation and metrics on a served model with tight limits."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import torch
from nnsight.intervention.backends.remote import RemoteError

from runtime.wire import capture_blob, submit_sleeper

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPT = "NNsight traces a model"


def _slow_handle() -> Any:
    from ray import serve

    from runtime.conftest_names import SLOW_APP

    return serve.get_app_handle(SLOW_APP)


def test_timeout_stops_the_job_and_the_model_keeps_serving(slow_client_model: Any) -> None:
    started = time.monotonic()
    with pytest.raises(RemoteError, match="timeout of 3 seconds"):
        with slow_client_model.trace(PROMPT, remote=True):
            slow_client_model.model.layers[0].output.save()
            n = 0
            while True:
                n += 1
    assert time.monotonic() - started < 30
    with slow_client_model.trace(PROMPT, remote=True):
        first = slow_client_model.lm_head.output.save()
    with slow_client_model.trace(PROMPT, remote=True):
        second = slow_client_model.lm_head.output.save()
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", ["finally_recurses", "catch_in_a_hook", "long_sleep"])
def test_a_program_that_catches_its_stop_ends_and_the_same_replica_serves_on(name: str,
                                                                             slow_client_model: Any) -> None:
    """Programs built to outlive their stop (tests/sandbox/attacks/uncatchable.py), from a file
    only the client has: each ends at the timeout, the replica is not wedged (not replaced: its
    timeout count goes up) and the next request is correct."""
    from sandbox import client_only
    from sandbox.attacks import uncatchable

    program = getattr(client_only.load(uncatchable), name)
    before = _slow_handle().info.remote().result()["metrics"].get("requests_timeout", 0)
    with pytest.raises(RemoteError, match="timeout of 3 seconds"):
        program(slow_client_model, slow_client_model._remote_backend(True, True, None, False))
    info = _slow_handle().info.remote().result()
    assert not info["wedged"] and info["metrics"].get("requests_timeout", 0) == before + 1
    with slow_client_model.trace(PROMPT, remote=True):
        logits = slow_client_model.lm_head.output.save()
    assert logits.ndim == 3


@pytest.mark.parametrize(("name", "expected"), [("int_power", "bits"), ("expand_then_sum", "elements"),
                                              ("sum_repeat", "timeout of 3 seconds")])
def test_one_long_c_call_ends_or_is_refused_and_the_same_replica_serves_on(name: str, expected: str,
                                                                          slow_client_model: Any) -> None:
    """Programs that would sit in one C call (tests/sandbox/attacks/native_work.py), through the
    gateway: refused before the call with the bound it is over, or ended at the stop; never
    wedged (the replica is not replaced) and the next request is correct."""
    from sandbox import client_only
    from sandbox.attacks import native_work

    program = getattr(client_only.load(native_work), name)
    with pytest.raises(RemoteError, match=expected):
        program(slow_client_model, slow_client_model._remote_backend(True, True, None, False))
    info = _slow_handle().info.remote().result()
    assert not info["wedged"]
    with slow_client_model.trace(PROMPT, remote=True):
        logits = slow_client_model.lm_head.output.save()
    assert logits.ndim == 3


def test_full_queue_is_refused_not_hung(slow_client_model: Any, served: dict[str, Any]) -> None:
    def sleeper() -> Any:
        return submit_sleeper(slow_client_model, PROMPT, 2.0)

    running = sleeper()
    time.sleep(1.0)  # the first one is running now
    queued = sleeper()  # waits: the queue holds one
    time.sleep(1.0)
    refusals = []
    for _ in range(2):
        try:
            sleeper()
        except RemoteError as exc:
            refusals.append(str(exc))
    assert refusals and all("queue" in r and "full" in r for r in refusals)
    for backend in (running, queued):
        for _ in range(200):
            if backend() is not None:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("an admitted job never finished")


def test_warm_refuses_with_activation_request_then_activates_from_memory(
    slow_client_model: Any, served: dict[str, Any]
) -> None:
    handle = _slow_handle()
    handle.set_level.remote("Warm").result()
    with pytest.raises(RemoteError, match=r"WARM.*activation to HOT was requested"):
        with slow_client_model.trace(PROMPT, remote=True):
            slow_client_model.lm_head.output.save()
    status = httpx.get(served["url"] + "/status").json()["deployments"]
    entry = next(v for v in status.values() if v["repo_id"] == str(served["slow_path"]))
    assert entry["deployment_level"] == "WARM" and entry["activation_requested"]
    assert entry["deployment"] == "default/tiny-slow" and entry["activation_requested_at"] > 0
    warm = handle.activate.remote().result()
    # The WARM replica kept only the node store's copy: becoming HOT copies from it, no disk read.
    assert warm["from_level"] == "Warm" and warm["source"] == "nodeMemory"
    with slow_client_model.trace(PROMPT, remote=True):
        logits = slow_client_model.lm_head.output.save()
    assert logits.ndim == 3
    # The first request's integrity index restores from the store's pages: it copied no weights.
    index = handle.info.remote().result()["weight_index"]
    assert index["kept_bytes"] == 0 and index["source_bytes"] > 0

    handle.set_level.remote("Cold").result()
    with pytest.raises(RemoteError, match="COLD"):
        with slow_client_model.trace(PROMPT, remote=True):
            slow_client_model.lm_head.output.save()
    cold = handle.activate.remote().result()
    assert cold["from_level"] == "Cold" and cold["source"] == "localPath"
    # Becoming HOT from RAM reads and builds nothing: it must beat a load from disk.
    assert warm["seconds"] < cold["seconds"]
    with slow_client_model.trace(PROMPT, remote=True):
        again = slow_client_model.lm_head.output.save()
    assert torch.equal(again, logits)


def test_metrics_by_model(slow_client_model: Any) -> None:
    info = _slow_handle().info.remote().result()
    metrics = info["metrics"]
    assert metrics["requests_completed"] >= 3
    assert metrics["requests_timeout"] >= 1
    assert metrics["bytes_in"] > 0 and metrics["bytes_out"] > 0
    assert metrics["load_seconds_localPath"] > 0
    assert info["queue_depth"] == 0
    assert info["prometheus"]  # ray.serve.metrics are live in the replica


def test_payload_limit_enforced_in_the_replica_too(slow_client_model: Any) -> None:
    key, blob = capture_blob(slow_client_model, PROMPT)
    events = list(
        _slow_handle().options(method_name="execute", stream=True).remote(
            "job", {"model_key": key, "compress": True}, blob + b"\0" * 200_000, 0
        )
    )
    assert events[-1]["status"] == "ERROR" and "exceeds" in events[-1]["description"]


def test_wedged_replica_is_replaced_and_serves_again(slow_client_model: Any, served: dict[str, Any]) -> None:
    """A job stuck in one C call ignores its stop and the async exception: the replica fails its
    health check and Serve starts a fresh one; the next request is correct."""
    with pytest.raises(RemoteError, match="timeout"):
        with slow_client_model.trace(PROMPT, remote=True):
            slow_client_model.model.layers[0].output.save()
            # One C call far longer than timeout (3 s) + grace (5 s), through the test-only hook
            # this app enables (tests/README.md): neither the stop nor the async exception reaches it.
            from model_runtime.sandbox.wedge_hook import block

            block(60)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with slow_client_model.trace(PROMPT, remote=True):
                logits = slow_client_model.lm_head.output.save()
            break
        except RemoteError:
            time.sleep(1)  # COLD/unavailable while Serve replaces the replica
    else:
        raise AssertionError("the model never served again")
    info = _slow_handle().info.remote().result()
    assert not info["wedged"] and info["metrics"].get("requests_timeout", 0) == 0  # a fresh process
    assert logits.ndim == 3

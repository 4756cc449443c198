"""The unmodified nnsight 0.8.1 client against the gateway + model app on a local Ray Serve."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import nnsight
import pytest
import torch
from nnsight.intervention.backends.remote import RemoteError

from runtime.wire import poll_backend

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPT = "The Eiffel Tower is in the city of"


def test_blocking_trace_equals_local(client_model: Any, local_model: Any) -> None:
    with client_model.trace(PROMPT, remote=True):
        hidden = client_model.model.layers[0].output.save()
        logits = client_model.lm_head.output.save()
    with local_model.trace(PROMPT):
        ref_hidden = local_model.model.layers[0].output.save()
        ref_logits = local_model.lm_head.output.save()
    assert torch.equal(hidden, ref_hidden)
    assert torch.equal(logits, ref_logits)


def test_the_unmodified_client_through_the_gateways_own_listener(
    served: dict[str, Any], client_model: Any, local_model: Any
) -> None:
    """The gateway replica's own listener (`direct_port`, what users are given) serves the same
    protocol without Serve's proxy: the websocket session with an inline result, and the
    non-blocking poll whose result URL points back at this door and is downloaded through it."""
    door = served["door_url"]
    nnsight.CONFIG.API.HOST = door
    try:
        with client_model.trace(PROMPT, remote=True):
            logits = client_model.lm_head.output.save()
        with client_model.trace(PROMPT, remote=True, blocking=False) as tracer:
            polled = client_model.lm_head.output.save()  # noqa: F841 (read back by name)
        result = poll_backend(tracer.backend)
        assert result is not None, f"job never completed (last status {tracer.backend.status})"
        with urllib.request.urlopen(f"{door}/response/{tracer.backend.job_id}", timeout=30) as response:
            assert json.loads(response.read())["data"].startswith(f"{door}/result/")
    finally:
        nnsight.CONFIG.API.HOST = served["url"]
    with local_model.trace(PROMPT):
        ref = local_model.lm_head.output.save()
    assert torch.equal(logits, ref) and torch.equal(result["polled"], ref)


def test_patch_and_non_blocking(client_model: Any, local_model: Any) -> None:
    with client_model.trace(PROMPT, remote=True, blocking=False) as tracer:
        client_model.model.layers[1].mlp.output[:] = 0
        logits = client_model.lm_head.output.save()  # noqa: F841 (read back by name)
    backend = tracer.backend
    assert backend.job_id  # minted by the server
    result = poll_backend(backend)
    assert result is not None, f"job never completed (last status {backend.status})"
    with local_model.trace(PROMPT):
        local_model.model.layers[1].mlp.output[:] = 0
        ref = local_model.lm_head.output.save()
    assert torch.equal(result["logits"], ref)


def test_user_exception_is_remote_error_with_traceback(client_model: Any) -> None:
    with pytest.raises(RemoteError) as info:
        with client_model.trace(PROMPT, remote=True):
            hidden = client_model.model.layers[0].output.save()
            raise ValueError(f"user boom {hidden.shape}")
    text = str(info.value)
    assert "user boom" in text and "ValueError" in text
    assert __file__ in text  # the user's own frame, by file name
    # The replica keeps serving after a user error.
    with client_model.trace(PROMPT, remote=True):
        ok = client_model.lm_head.output.save()
    assert ok.shape[-1] > 0


def test_print_arrives_as_log(client_model: Any, capfd: pytest.CaptureFixture[str]) -> None:
    nnsight.CONFIG.APP.REMOTE_LOGGING = True
    try:
        with client_model.trace(PROMPT, remote=True):
            print("hello from the server side")
            client_model.lm_head.output.save()
    finally:
        nnsight.CONFIG.APP.REMOTE_LOGGING = False
    out, err = capfd.readouterr()
    assert "hello from the server side" in out + err
    assert "LOG" in out + err


def test_generate_equals_local(client_model: Any, local_model: Any) -> None:
    with client_model.generate(PROMPT, max_new_tokens=3, do_sample=False, remote=True) as tracer:
        tokens = tracer.result.save()
    with local_model.generate(PROMPT, max_new_tokens=3, do_sample=False) as tracer:
        ref = tracer.result.save()
    assert torch.equal(tokens, ref)


def test_session_with_two_traces(client_model: Any, local_model: Any) -> None:
    with client_model.session(remote=True):
        with client_model.trace(PROMPT):
            hidden = client_model.model.layers[0].output.save()
        with client_model.trace("Madison Square Garden is in"):
            client_model.model.layers[0].output[:, -1, :] = hidden[:, -1, :]
            patched = client_model.lm_head.output.save()
    with local_model.session():
        with local_model.trace(PROMPT):
            ref_hidden = local_model.model.layers[0].output.save()
        with local_model.trace("Madison Square Garden is in"):
            local_model.model.layers[0].output[:, -1, :] = ref_hidden[:, -1, :]
            ref_patched = local_model.lm_head.output.save()
    assert torch.equal(hidden, ref_hidden)
    assert torch.equal(patched, ref_patched)

"""Two users of one replica through the real gateway and client: an attacker's requests (new
escape classes) fail or stay harmless, and the victim's results and jobs are untouched."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import nnsight
import pytest
import torch
from nnsight.intervention.backends.remote import RemoteBackend, RemoteError
from nnsight.tracing import util as nnsight_util
from sandbox.attacks import loaders, provenance, source_names, stops

from runtime.wire import API_KEY, VICTIM_KEY, poll_backend

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPT = "The Eiffel Tower is in the city of"
REFUSED = [provenance.module_dict_setitem, provenance.module_dict_update_method, provenance.weight_tensor_attribute,
           stops.finally_continue, stops.finally_return_in_helper, loaders.generate_trust_remote_code,
           loaders.generate_custom_generate,
           # on state nnsight made for the victim's first `.source` (after the model was first served)
           provenance.source_lines_edited, provenance.source_route_added, provenance.interleaver_mediator_planted]


@pytest.fixture()
def as_user() -> Iterator[Any]:
    def use(key: str) -> None:
        nnsight.CONFIG.API.APIKEY = key

    yield use
    nnsight.CONFIG.API.APIKEY = None


def _victim_run(client_model: Any, url: str) -> tuple[dict[str, Any], Any]:
    with client_model.trace(PROMPT, remote=url):
        query = client_model.model.layers[0].self_attn.source.self_q_proj_0.output.save()
        client_model.model.layers[0].output[:, -1, :] += 1.0
        logits = client_model.lm_head.output.save()
    with client_model.trace(PROMPT, remote=url, blocking=False) as tracer:
        hidden = client_model.model.layers[1].output.save()  # noqa: F841 (read back by name)
    result = poll_backend(tracer.backend)
    assert result is not None
    return {"logits": logits, "query": query, "hidden": result["hidden"]}, tracer.backend.job_id


def test_attacker_cannot_touch_the_victim(client_model: Any, served: dict[str, Any], as_user: Any) -> None:
    url = served["strict_url"]
    as_user(VICTIM_KEY)
    before, victim_job = _victim_run(client_model, url)

    as_user(API_KEY)
    backend = RemoteBackend(client_model.to_model_key(), host=url, env=client_model._remoteable_get_env())
    for attack in REFUSED:
        with pytest.raises(RemoteError):
            attack(client_model, backend)
    with pytest.raises(RemoteError) as info:
        with client_model.trace(PROMPT, remote=url):
            client_model.lm_head.output.save()
            raise ValueError("x" * 5_000_000)
    assert len(str(info.value)) < 40_000, "the error text must be bounded"
    # A modified client claiming a server file as its source: the server uses the request's text.
    original = nnsight_util.SerializedFrame.of
    nnsight_util.SerializedFrame.of = lambda frame: nnsight_util.SerializedFrame(  # type: ignore[method-assign]
        __import__("transformers.models.llama.modeling_llama", fromlist=["x"]).__file__, 1, "forward")
    try:
        saved = source_names.nested_invokes(client_model, backend)
    finally:
        nnsight_util.SerializedFrame.of = original  # type: ignore[method-assign]
    assert len(saved["outs"]) == 2
    peek = httpx.get(f"{url}/response/{victim_job}", headers={"ndif-api-key": API_KEY}, timeout=30)
    assert peek.status_code == 404, "another key's job must be invisible"

    as_user(VICTIM_KEY)
    after, _ = _victim_run(client_model, url)
    for name in before:
        assert torch.equal(before[name], after[name]), name

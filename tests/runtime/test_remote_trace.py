"""The unmodified nnsight 0.8.1 client against the gateway + model app on a local Ray Serve."""

from __future__ import annotations

from typing import Any

import pytest
import torch

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

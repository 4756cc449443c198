"""A weight gathered whole for a request is guarded like the weight itself, for that request."""

from __future__ import annotations

import pytest
import torch

from model_runtime.sandbox.dispatch_guard import ServerStorage, WriteGuard, guard_also
from model_runtime.sandbox.errors import ModelTampering


def test_a_tensor_guarded_during_a_request_refuses_writes_until_the_request_ends() -> None:
    copy = torch.ones(4)
    guard = WriteGuard(ServerStorage.of([]))
    with guard:
        torch.zeros(2).add_(1)  # the request's own tensors stay writable
        guard_also([copy])
        with pytest.raises(ModelTampering):
            copy.add_(1)
        with pytest.raises(ModelTampering):
            copy[0] = 5.0
    copy.add_(1)  # the guard is gone with the request
    assert copy.tolist() == [2.0] * 4


def test_without_a_guard_nothing_happens() -> None:
    guard_also([torch.ones(2)])

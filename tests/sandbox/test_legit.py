"""Legitimate programs give the same results in the sandbox as an unsandboxed local trace."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from sandbox.legit_programs import PROGRAMS


def assert_same(local: Any, remote: Any, path: str = "") -> None:
    if isinstance(local, torch.Tensor):
        assert isinstance(remote, torch.Tensor), path
        assert torch.equal(local, remote), path
    elif isinstance(local, dict):
        assert set(local) == set(remote), path
        for key in local:
            assert_same(local[key], remote[key], f"{path}.{key}")
    elif isinstance(local, (list, tuple)):
        assert len(local) == len(remote), path
        for i, (a, b) in enumerate(zip(local, remote, strict=True)):
            assert_same(a, b, f"{path}[{i}]")
    else:
        assert local == remote, path


@pytest.mark.parametrize("program", PROGRAMS, ids=lambda p: p.__name__)
def test_legit_program_matches_local(program: Any, models: tuple[Any, Any], backend: Any) -> None:
    client, server = models
    torch.manual_seed(0)
    local = program(server, None)
    torch.manual_seed(0)
    be = backend()
    remote = program(client, be)
    assert_same(local, remote)
    if program.__name__ == "printing":
        assert be.logs and be.logs[0].startswith("shape")

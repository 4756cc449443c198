"""Research programs through the real gateway and the unmodified nnsight client, from a file the
server does not have (tests/sandbox/client_only.py): nested invokes and traces under `for`/`if`,
gradients, `+=` on slices, captured slices, classes; each equals a local trace."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from nnsight.intervention.backends.remote import RemoteError
from sandbox import client_only, research_programs
from sandbox.test_legit import assert_same

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROGRAMS = client_only.load(research_programs)


def assert_remote_equals_local(program: Any, local_model: Any, client_model: Any, local_arg: Any,
                               remote_arg: Any) -> None:
    """`program(local_model, local_arg)` and `program(client_model, remote_arg)` save the same values."""
    torch.manual_seed(0)
    local = program(local_model, local_arg)
    torch.manual_seed(0)
    remote = program(client_model, remote_arg)
    assert_same(local, remote)


@pytest.mark.parametrize("name", [p.__name__ for p in research_programs.PROGRAMS])
def test_program_from_a_client_only_file_equals_local(name: str, client_model: Any, local_model: Any) -> None:
    assert_remote_equals_local(getattr(PROGRAMS, name), local_model, client_model, False, True)


def test_remote_traceback_shows_only_the_users_frames(client_model: Any) -> None:
    with pytest.raises(RemoteError) as info:
        PROGRAMS.user_error(client_model, True)
    text = str(info.value)
    assert "ValueError: user boom" in text
    assert f'File "{client_only.CLIENT_ONLY_DIR}/research_programs.py", line' in text
    assert text.count('File "') == 1, text
    for server_part in ("site-packages", "model_runtime", "nnsight/", "/tmp/", "ray"):
        assert server_part not in text, text


def test_the_model_deployments_limits_reach_the_sandbox(slow_client_model: Any) -> None:
    """The slow app's user_config says maxBatchSize 1, maxSequenceLength 64 (tests/runtime/conftest.py)."""
    with pytest.raises(RemoteError, match="maxBatchSize"):
        with slow_client_model.trace(["one prompt", "two prompts"], remote=True):
            slow_client_model.lm_head.output.save()
    with pytest.raises(RemoteError, match="maxSequenceLength"):
        with slow_client_model.trace("word " * 100, remote=True):
            slow_client_model.lm_head.output.save()
    with slow_client_model.trace("one prompt", remote=True):
        ok = slow_client_model.lm_head.output.save()
    assert ok.shape[0] == 1

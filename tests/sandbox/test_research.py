"""Research programs (tests/sandbox/research_programs.py) from a client-only file, sandboxed,
equal a local trace; the user's exception comes back with only the user's frames."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from model_runtime.sandbox import RequestFailed
from sandbox import client_only, research_programs
from sandbox.test_legit import assert_same

PROGRAMS = client_only.load(research_programs)


ARCHITECTURES = ["llama", "gpt2", "gpt-neox"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("name", [p.__name__ for p in research_programs.PROGRAMS])
def test_research_program_matches_local(name: str, arch: str, arch_models: Any, sandbox: Any) -> None:
    from sandbox.harness import SandboxBackend

    client, server, local_model = arch_models(arch)
    program = getattr(PROGRAMS, name)
    torch.manual_seed(0)
    local = program(local_model, False)
    torch.manual_seed(0)
    remote = program(client, SandboxBackend(client, server, sandbox))
    assert_same(local, remote)


def test_corpus_size() -> None:
    from sandbox.legit_programs import PROGRAMS as LEGIT

    assert len(research_programs.PROGRAMS) + len(LEGIT) >= 60


def test_user_traceback_shows_only_user_frames(models: tuple[Any, Any], backend: Any) -> None:
    client, _server = models
    with pytest.raises(RequestFailed) as info:
        PROGRAMS.user_error(client, backend())
    text = str(info.value)
    assert "ValueError: user boom" in text
    assert f'File "{client_only.CLIENT_ONLY_DIR}/research_programs.py", line' in text
    assert "raise ValueError" in text  # the user's line, from the source the request shipped
    assert "site-packages" not in text and "model_runtime" not in text and "nnsight" not in text
    assert text.count('File "') == 1

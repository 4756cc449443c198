"""The legitimate corpus end to end: the unmodified nnsight client, the real gateway, a Ray Serve
replica running the sandbox, programs from a file the server does not have
(tests/sandbox/client_only.py); each equals a local trace.

* every program of tests/sandbox/legit_programs.py on the tiny llama the runtime tests serve;
* a representative subset of tests/sandbox/research_programs.py (sweeps and invokes in loops,
  sessions with inner backward blocks, attribution patching, steering with `+=`, generation) on
  tiny gpt2 and gpt-neox, served by their own replicas behind a gateway at /archs (the whole
  corpus runs on all three architectures in-process, tests/sandbox/test_research.py, and on
  llama through the gateway, test_remote_research.py).
"""

from __future__ import annotations

from typing import Any

import pytest
from sandbox import client_only, legit_programs, research_programs

from runtime.test_remote_research import assert_remote_equals_local

pytestmark = [pytest.mark.ray, pytest.mark.slow]

LEGIT = client_only.load(legit_programs)
RESEARCH = client_only.load(research_programs)
SUBSET = ["invokes_in_for", "patching_sweep_in_session", "steering_with_plus_equals", "attribution_patching",
          "session_with_inner_backward", "logit_lens", "generate_with_steering", "integrated_gradients_steps"]


@pytest.mark.parametrize("name", [p.__name__ for p in legit_programs.PROGRAMS])
def test_legit_program_through_the_gateway_equals_local(name: str, client_model: Any, local_model: Any) -> None:
    backend = client_model._remote_backend(True, True, None, False)  # what `remote=True` builds
    assert_remote_equals_local(getattr(LEGIT, name), local_model, client_model, None, backend)


@pytest.fixture(scope="module")
def arch_pair(served_archs: dict[str, Any]) -> Any:
    from nnsight import TransformersModel
    from nnsight.modeling.huggingface import _ID_CACHE

    pairs: dict[str, tuple[str, Any, Any]] = {}

    def get(arch: str) -> tuple[str, Any, Any]:
        if arch not in pairs:
            url, path = served_archs[arch]
            _ID_CACHE[str(path)] = str(path)
            client = TransformersModel(str(path), task="text-generation")
            local = TransformersModel(str(path), task="text-generation", dispatch=True, device_map="cpu",
                                      dtype="float32")
            pairs[arch] = (url, client, local)
        return pairs[arch]

    return get


def test_the_subset_is_in_the_corpus() -> None:
    assert set(SUBSET) <= {p.__name__ for p in research_programs.PROGRAMS}


@pytest.mark.parametrize("arch", ["gpt2", "gpt-neox"])
@pytest.mark.parametrize("name", SUBSET)
def test_research_program_on_another_architecture_equals_local(name: str, arch: str, arch_pair: Any) -> None:
    url, client, local_model = arch_pair(arch)
    # nnsight's `remote=<host URL>`: the gateway at /archs
    assert_remote_equals_local(getattr(RESEARCH, name), local_model, client, False, url)

"""The seam with the runtime: `execution.execute_request(..., runner=executor.SANDBOXED)` (what
`select_runner()` picks unless NDIF_SANDBOX=0) gives the same results for legit programs and an
error text for attacks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from nnsight.intervention.backends.remote import RemoteBackend

from model_runtime.replica import execution
from model_runtime.sandbox import executor
from sandbox.attacks import escapes, resources, tampering
from sandbox.harness import SECRET, weights_digest
from sandbox.legit_programs import PROGRAMS
from sandbox.test_legit import assert_same


class SeamBackend(RemoteBackend):
    def __init__(self, client: Any, server: Any, limits: execution.ExecutionLimits) -> None:
        super().__init__(client.to_model_key(), host="http://sandbox.invalid", env=client._remoteable_get_env())
        self.server, self.limits, self.logs = server, limits, []

    def request(self, request: Any, tracer: Any) -> Any:
        blob = self._serialize(tracer)
        envelope = execution.Envelope(**request.model_dump())
        out = execution.execute_request(
            self.server, blob, envelope, limits=self.limits, on_log=self.logs.append, runner=executor.SANDBOXED
        )
        if out.error is not None:
            raise RuntimeError(out.error)
        return self.finalize(out.result)


@pytest.fixture()
def sandboxed_runtime(models: tuple[Any, Any]) -> Any:
    client, server = models

    def make(timeout: float = 10.0) -> SeamBackend:
        return SeamBackend(client, server, execution.ExecutionLimits(timeout_seconds=timeout, cancel_grace_seconds=3))

    return make


@pytest.mark.parametrize("program", [PROGRAMS[i] for i in (0, 3, 5, 8, 9, 11, 13)], ids=lambda p: p.__name__)
def test_legit_through_the_runtime_seam(program: Any, models: tuple[Any, Any], sandboxed_runtime: Any) -> None:
    client, server = models
    torch.manual_seed(0)
    local = program(server, None)
    torch.manual_seed(0)
    assert_same(local, program(client, sandboxed_runtime()))


def test_select_runner_picks_the_sandbox_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NDIF_SANDBOX", raising=False)
    assert execution.select_runner() is executor.SANDBOXED
    monkeypatch.setenv("NDIF_SANDBOX", "0")
    assert execution.select_runner() is execution.PLAIN


def test_print_reaches_on_log(models: tuple[Any, Any], sandboxed_runtime: Any) -> None:
    from sandbox.legit_programs import printing

    be = sandboxed_runtime()
    printing(models[0], be)
    assert any(line.startswith("shape") for line in be.logs)


@pytest.mark.parametrize(
    "attack",
    [escapes.subclasses_walk, escapes.leak_secret, tampering.weight_zero_method, escapes.attack_in_invoke,
     resources.infinite_loop_swallowing],
    ids=lambda a: a.__name__,
)
def test_attacks_through_the_runtime_seam(attack: Any, models: tuple[Any, Any], sandboxed_runtime: Any) -> None:
    client, server = models
    before = weights_digest(server)
    with pytest.raises(RuntimeError) as info:
        attack(client, sandboxed_runtime(timeout=1.5))
    text = str(info.value)
    assert ("[" in text and "]" in text) or "timeout" in text
    assert SECRET not in text
    assert weights_digest(server) == before


def test_user_exception_carries_the_users_frame(models: tuple[Any, Any], sandboxed_runtime: Any) -> None:
    from sandbox.legit_programs import PROMPT

    client = models[0]
    with pytest.raises(RuntimeError) as info:
        with client.trace(PROMPT, backend=sandboxed_runtime()):
            hidden = client.model.layers[0].output.save()
            raise ValueError(f"user boom {hidden.shape}")
    text = str(info.value)
    assert "user boom" in text and "ValueError" in text
    assert __file__ in text

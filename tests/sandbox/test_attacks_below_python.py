"""Classes 3 (weights changed), 4 (uninitialised memory) and 5 (state that outlives the request),
through the production path.

Each program goes from the unmodified nnsight client through `execution.execute_request` with
the sandbox's runner, as on a replica. Class 3 runs twice: with every layer, and with the
Python-level protection checks blinded (`is_protected` answers False for everything), so the
dispatch guard and the integrity check are shown to hold on their own.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from model_runtime.replica import execution
from model_runtime.sandbox import executor
from model_runtime.sandbox.model_guard import WeightGuard
from sandbox.attacks import below_python, lingering_state
from sandbox.harness import weights_digest
from sandbox.legit_programs import save_hidden, save_logits
from sandbox.test_seam import SeamBackend


@pytest.fixture()
def python_layer(request: pytest.FixtureRequest, models: tuple[Any, Any]) -> Iterator[str]:
    """'on': every layer; 'blind': the Python-level checks think nothing is protected."""
    mode = request.param
    box = executor.default_sandbox()
    if mode == "blind":
        original = WeightGuard.is_protected
        WeightGuard.is_protected = lambda self, value: False  # type: ignore[method-assign]
        box.forget(models[1])  # rebuild the guards with the blinded check
        try:
            yield mode
        finally:
            WeightGuard.is_protected = original  # type: ignore[method-assign]
            box.forget(models[1])
    else:
        yield mode


@pytest.fixture()
def sandboxed_runtime(models: tuple[Any, Any]) -> Any:
    """A client backend that runs each request through `execute_request` with the sandbox's runner."""
    limits = execution.ExecutionLimits(timeout_seconds=10.0, cancel_grace_seconds=3)
    return lambda: SeamBackend(models[0], models[1], limits)


@pytest.fixture(scope="module")
def reference(models: tuple[Any, Any]) -> dict[str, Any]:
    return save_logits(models[1], None)


@pytest.mark.parametrize("python_layer", ["on", "blind"], indirect=True)
@pytest.mark.parametrize("attack", below_python.WEIGHT_ATTACKS, ids=lambda a: a.__name__)
def test_weight_attack_is_refused(
    attack: Any, python_layer: str, models: tuple[Any, Any], sandboxed_runtime: Any, reference: Any
) -> None:
    client, server = models
    before = weights_digest(server)
    shapes = [tuple(p.shape) for p in server._module.parameters()]
    with pytest.raises(RuntimeError) as info:
        attack(client, sandboxed_runtime())
    assert str(info.value).strip()
    assert weights_digest(server) == before, "the weights changed"
    assert shapes == [tuple(p.shape) for p in server._module.parameters()], "a weight's shape changed"
    assert executor.sandbox_healthy()
    after = save_logits(client, sandboxed_runtime())
    assert torch.equal(after["logits"], reference["logits"]), "the next request is wrong"


@pytest.mark.parametrize("attack", below_python.UNINITIALISED_ATTACKS, ids=lambda a: a.__name__)
def test_uninitialised_memory_holds_nothing_of_an_earlier_request(
    attack: Any, models: tuple[Any, Any], sandboxed_runtime: Any
) -> None:
    client = models[0]
    for _ in range(3):  # a victim's activations, freed just before the attacker allocates
        save_hidden(client, sandboxed_runtime())
        try:
            leak = attack(client, sandboxed_runtime())
        except RuntimeError as exc:  # refused outright by a Python-level check: also fine
            assert str(exc).strip()
            continue
        assert isinstance(leak, torch.Tensor) and leak.numel() > 0
        assert not leak.any(), "uninitialised memory reached the client"


@pytest.mark.parametrize("attack", lingering_state.ATTACKS, ids=lambda a: a.__name__)
def test_state_does_not_outlive_the_request(attack: Any, models: tuple[Any, Any], sandboxed_runtime: Any) -> None:
    client = models[0]
    before = lingering_state.probe(client, sandboxed_runtime())
    try:
        attack(client, sandboxed_runtime())
    except RuntimeError as exc:  # refused outright (the setters are not reachable): also fine
        assert str(exc).strip()
    after = lingering_state.probe(client, sandboxed_runtime())
    assert after["state"][:-1] == before["state"][:-1]
    assert torch.equal(after["state"][-1], before["state"][-1]), "the RNG stream changed"
    assert torch.equal(after["logits"], before["logits"])


def _thread_state() -> tuple[Any, ...]:
    """This thread's torch state that a finaliser of a request's object could change."""
    tls = torch._C
    return (tls._dispatch_tls_local_include_set().raw_repr(), tls._dispatch_tls_local_exclude_set().raw_repr(),
            torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu"),
            torch._C._len_torch_dispatch_stack(), torch._C._len_torch_function_stack())


@pytest.fixture(params=["every layer", "caller's collection only"])
def teardown(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """'caller's collection only': the request thread frees nothing itself, so the objects are
    finalised by the collection on the caller's thread and only the collector callback stands."""
    if request.param != "every layer":
        monkeypatch.setattr(executor, "release_request_objects", lambda model, error: None)
    return str(request.param)


@pytest.mark.parametrize("attack", lingering_state.IN_A_CYCLE, ids=lambda a: a.__name__)
def test_objects_left_in_a_cycle_change_no_other_thread(attack: Any, teardown: str, models: tuple[Any, Any]) -> None:
    client, server = models
    timeout = 4.0 if attack is lingering_state.cycle_left_by_a_stopped_request else 30.0

    def runtime(seconds: float = 30.0) -> SeamBackend:
        return SeamBackend(client, server, execution.ExecutionLimits(timeout_seconds=seconds, cancel_grace_seconds=2))

    before = lingering_state.probe(client, runtime())
    caller = _thread_state()
    try:
        attack(client, runtime(timeout))
    except RuntimeError as exc:  # the stopped one ends with its timeout
        assert str(exc).strip()
    gc.collect()  # whatever the request left, collected here: the runtime's caller thread
    assert _thread_state() == caller, "the request's objects changed the caller thread's torch state"
    after = lingering_state.probe(client, runtime())
    assert after["state"][:-1] == before["state"][:-1]
    assert torch.equal(after["logits"], before["logits"])
    assert executor.sandbox_healthy()


def test_objects_left_in_a_cycle_under_the_python_fallback_guard(models: tuple[Any, Any],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback guard is a Python dispatch mode: an inference-mode guard freed on the caller
    thread used to leave the Python dispatch key on it without a mode, and every later op there
    failed ("Hit Python dispatch key but no arguments had PyInterpreter")."""
    from model_runtime.sandbox import native_guard

    monkeypatch.setattr(native_guard, "load", lambda: None)
    monkeypatch.setattr(executor, "release_request_objects", lambda model, error: None)  # the callback alone
    client, server = models
    runtime = SeamBackend(client, server, execution.ExecutionLimits(timeout_seconds=30.0, cancel_grace_seconds=2))
    caller = _thread_state()
    lingering_state.inference_mode_in_a_cycle(client, runtime)
    gc.collect()
    assert _thread_state() == caller
    assert torch.ones(2).add_(1).tolist() == [2.0, 2.0]  # ops on the caller thread still dispatch


def test_corpus_size() -> None:
    assert len(below_python.WEIGHT_ATTACKS) >= 5 and len(below_python.UNINITIALISED_ATTACKS) >= 5
    assert len(lingering_state.ATTACKS) >= 5 and len(lingering_state.IN_A_CYCLE) >= 5

"""The attack corpus: every program fails with a clear error and leaves no trace behind.

After each attack: no file in the attack directory, the fake secret in no error/log, the served
weights bit-identical, and the next legitimate request still equal to the reference.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from model_runtime.sandbox import Limits, RequestFailed, SandboxError
from sandbox.attacks import TARGET, capabilities, escapes, loaders, provenance, resources, stops, tampering
from sandbox.harness import SECRET, weights_digest
from sandbox.legit_programs import save_logits

ATTACKS = (escapes.ATTACKS + capabilities.ATTACKS + tampering.ATTACKS + resources.ATTACKS
           + provenance.ATTACKS + stops.ATTACKS + loaders.ATTACKS)
ATTACK_DIR = Path(TARGET).parent
# Resource attacks get a short clock so the suite stays fast.
SHORT = Limits(timeout_s=1.5, grace_s=3.0, memory_bytes=2 * 1024**3, max_result_bytes=4 * 1024**2)


@pytest.fixture(scope="module")
def reference(models: tuple[Any, Any]) -> dict[str, Any]:
    return save_logits(models[1], None)


@pytest.fixture(autouse=True)
def attack_dir() -> Any:
    shutil.rmtree(ATTACK_DIR, ignore_errors=True)
    ATTACK_DIR.mkdir(parents=True)  # exists and is writable: only the sandbox stands in the way
    yield
    shutil.rmtree(ATTACK_DIR, ignore_errors=True)


def test_corpus_size() -> None:
    assert len(ATTACKS) >= 40


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: f"{a.__module__.rsplit('.', 1)[-1]}.{a.__name__}")
def test_attack_is_refused(attack: Any, models: tuple[Any, Any], backend: Any, reference: Any) -> None:
    client, server = models
    before = weights_digest(server)
    modules_before = [name for name, _ in server._module.named_modules()]
    limits = SHORT if attack in resources.ATTACKS else None
    be = backend(limits=limits)
    # Only the resource attacks may end as the user's own error (e.g. a MemoryError they raised):
    # every other attack must be stopped by a sandbox layer.
    expected = (SandboxError, RequestFailed) if attack in resources.ATTACKS else SandboxError
    with pytest.raises(expected) as info:
        attack(client, be)
    message = str(info.value)
    assert message.strip(), "the error must say what happened"
    assert SECRET not in message and all(SECRET not in line for line in be.logs)
    assert list(ATTACK_DIR.iterdir()) == [], "the attack wrote a file"
    assert weights_digest(server) == before, "the weights changed"
    assert modules_before == [name for name, _ in server._module.named_modules()], "the module tree changed"
    assert torch.get_default_dtype() == torch.float32
    after = save_logits(client, backend())
    assert torch.equal(after["logits"], reference["logits"]), "the next request is wrong"


@pytest.fixture(params=["every layer", "name rule blinded"])
def nnsight_name_rule(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """'name rule blinded': the attribute guard lets request code read nnsight's runtime objects
    (controllers, their State, the interleaver, `source.compiled`), so that only provenance and the
    after-request verification of nnsight's state (sandbox/nnsight_state.py) stand."""
    if request.param != "every layer":
        from model_runtime.sandbox.guards import Guards

        original = Guards._check_object_attr

        def blinded(self: Guards, obj: Any, name: str) -> None:
            owner = obj if isinstance(obj, type) else type(obj)
            if owner.__module__.startswith("nnsight.intervention") and owner.__name__ in (
                    "Controller", "State", "Interleaver", "Mediator", "Source"):
                return
            original(self, obj, name)

        monkeypatch.setattr(Guards, "_check_object_attr", blinded)
    return str(request.param)


def test_late_state_corpus_size() -> None:
    assert len(provenance.LATE_STATE) >= 5


@pytest.mark.parametrize("attack", provenance.LATE_STATE, ids=lambda a: a.__name__)
def test_nnsight_state_made_after_first_serve_is_verified(attack: Any, nnsight_name_rule: str,
                                                           models: tuple[Any, Any], backend: Any) -> None:
    client, server = models
    before = provenance.victim(client, backend())  # request A: nnsight builds the module's source state
    digest = weights_digest(server)
    with contextlib.suppress(SandboxError, RequestFailed):  # refused, or it ran and is undone after
        attack(client, backend())
    after = provenance.victim(client, backend())
    assert torch.equal(after["query"], before["query"]) and torch.equal(after["logits"], before["logits"])
    assert weights_digest(server) == digest
    interleaver = server.interleaver
    assert interleaver.mediators == [] and interleaver.observers == {} and not interleaver.interleaving
    state = server._module.model.layers[0].self_attn.__dict__["__nnsight__"]
    assert state.sourced and "planted" not in state.compiled.lines
    assert all(route[1] != "spy" and callable(route[0]) for route in state.routes)
    after_again = provenance.victim(client, backend())  # and the one after
    assert torch.equal(after_again["logits"], before["logits"])


def test_nnsight_state_changed_between_requests_is_undone_by_the_next(models: tuple[Any, Any], backend: Any) -> None:
    """nnsight's runtime state is recorded when first served and after a request that changed it;
    a change made between two requests (as a finaliser run at collection could) is put back when
    the next request ends."""
    from nnsight.intervention import source

    from model_runtime.sandbox import nnsight_state

    assert nnsight_state._DICT_VERSION is not None  # (so the envoy dicts' version tags are what is tested)
    client, server = models
    before = provenance.victim(client, backend())
    envoy_entries = vars(server.model.layers[0])
    key = object()
    envoy_entries["planted"] = "between requests"
    source.FORWARD_CACHE[key] = "planted"
    try:
        after = provenance.victim(client, backend())
        assert "planted" not in envoy_entries and key not in source.FORWARD_CACHE
        assert torch.equal(after["logits"], before["logits"])
        assert torch.equal(provenance.victim(client, backend())["logits"], before["logits"])
    finally:
        envoy_entries.pop("planted", None)
        source.FORWARD_CACHE.pop(key, None)

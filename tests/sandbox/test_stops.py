"""Stops that cannot be caught: programs built to outlive their timeout end with it, through the
production path, without the asynchronous exception, and the replica serves the next request.

Each program in `attacks/uncatchable.py` is allowed by the compile policy (or, for a
construct the policy refuses, refused up front) and without the stop checks would keep the request
thread busy past its grace period: the replica would count as wedged and be replaced.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from model_runtime.replica.request_thread import RequestThread, StopSignal, current_stop
from model_runtime.sandbox import CodeRejected, LimitExceeded, Limits
from model_runtime.sandbox.compiling import restricted_compile
from sandbox.attacks import uncatchable
from sandbox.harness import weights_digest
from sandbox.legit_programs import save_logits

SHORT = Limits(timeout_s=0.5, grace_s=4.0, memory_bytes=2 * 1024**3, max_result_bytes=4 * 1024**2)


@pytest.fixture(scope="module")
def reference(models: tuple[Any, Any]) -> dict[str, Any]:
    return save_logits(models[1], None)


@pytest.mark.parametrize("attack", uncatchable.ATTACKS, ids=lambda a: a.__name__)
def test_stop_cannot_be_absorbed(attack: Any, models: tuple[Any, Any], backend: Any, reference: Any) -> None:
    client, server = models
    before = weights_digest(server)
    be = backend(limits=SHORT)
    with pytest.raises((LimitExceeded, CodeRejected)) as info:
        attack(client, be)
    if isinstance(info.value, LimitExceeded):
        assert "timeout" in str(info.value)
        # Ended at a check in its own code: not by the asynchronous exception, never wedged.
        assert be.outcome.meta["stop"] == "cooperative", be.outcome.meta
        assert not be.outcome.wedged
    assert weights_digest(server) == before
    after = save_logits(client, backend())
    assert torch.equal(after["logits"], reference["logits"]), "the next request is wrong"


def test_every_loop_call_and_comprehension_checks_the_stop() -> None:
    source = (
        "def f(x):\n    return x\n"
        "g = lambda: 1\n"
        "while a:\n    pass\n"
        "for i in b:\n    pass\n"
        "c = [j for j in d if j]\n"
    )
    code = restricted_compile(source, "<test>")
    import dis

    def calls(co: Any) -> int:
        own = sum(1 for ins in dis.get_instructions(co) if ins.argval == "_check_stop_")
        return own + sum(calls(c) for c in co.co_consts if hasattr(c, "co_code"))

    assert calls(code) == 5  # function entry, lambda, while, for, comprehension


def test_a_stopped_signal_raises_at_every_check() -> None:
    signal = StopSignal(cancel=SystemExit)
    signal.check()
    signal.set()
    for _ in range(3):
        with pytest.raises(SystemExit):
            signal.check()
    with pytest.raises(SystemExit):
        signal.sleep(60)  # returns at once once stopped


def test_the_signal_is_the_running_tasks() -> None:
    thread = RequestThread("t")
    seen: list[StopSignal] = []
    thread.run(lambda: seen.append(current_stop()), timeout_s=5, grace_s=1, cancel=SystemExit)
    assert seen and seen[0] is not current_stop()  # the caller's thread has a signal that never fires
    assert not current_stop().stopped
    thread.stop()


def test_a_task_that_ignores_its_signal_is_still_stopped() -> None:
    import time

    thread = RequestThread("t")

    def ignores() -> None:
        while True:  # unsandboxed code: never checks the signal
            time.sleep(0.001)

    from model_runtime.replica.request_thread import Outcome

    assert thread.run(ignores, timeout_s=0.2, grace_s=2, cancel=SystemExit) is Outcome.STOPPED
    assert thread.forced

"""Class 5: state that outlives the request. Each program leaves a torch or interpreter setting
changed (`with` blocks held open by suspended generators, or a setter called directly); the next
request on the same replica thread must see the state as it was (`probe`)."""
# ruff: noqa: F841

import nnsight
import torch

from sandbox.attacks import PROMPT


def probe(model, backend):
    with model.trace(PROMPT, backend=backend):
        state = nnsight.save([
            torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu"),
            str(torch.get_autocast_dtype("cpu")), str(torch.get_default_dtype()),
            torch.are_deterministic_algorithms_enabled(), torch.get_float32_matmul_precision(),
            torch.get_num_threads(), torch.rand(3),
        ])
        logits = model.lm_head.output.save()
    return {"state": state, "logits": logits}


# Two `with` blocks held open by suspended generators and closed in the wrong order (when the
# request's locals are dropped, after it ended): the second exit puts back the first one's
# setting, so the setting stays changed on the replica's request thread.


def autocast_left_on(model, backend):
    def hold(flag):
        with torch.autocast("cpu", dtype=torch.float16, enabled=flag):
            yield 1

    with model.trace(PROMPT, backend=backend):
        first = hold(True)
        next(first)
        second = hold(False)
        next(second)
        out = model.lm_head.output.save()


def grad_mode_left_off(model, backend):
    def hold(ctx):
        with ctx:
            yield 1

    with model.trace(PROMPT, backend=backend):
        first = hold(torch.enable_grad())
        next(first)
        second = hold(torch.no_grad())
        next(second)
        out = model.lm_head.output.save()


def inference_mode_left_on(model, backend):
    def hold(flag):
        with torch.inference_mode(flag):
            yield 1

    with model.trace(PROMPT, backend=backend):
        first = hold(False)
        next(first)
        second = hold(True)
        next(second)
        third = hold(False)
        next(third)
        out = model.lm_head.output.save()


def reseed_rng(model, backend):
    # the next user's random draws would be predictable
    with model.trace(PROMPT, backend=backend):
        torch.manual_seed(1234)
        out = model.lm_head.output.save()


def deterministic_mode(model, backend):
    with model.trace(PROMPT, backend=backend):
        torch.use_deterministic_algorithms(True)
        out = model.lm_head.output.save()


def matmul_precision(model, backend):
    with model.trace(PROMPT, backend=backend):
        torch.set_float32_matmul_precision("medium")
        out = model.lm_head.output.save()


def default_dtype(model, backend):
    with model.trace(PROMPT, backend=backend):
        torch.set_default_dtype(torch.float64)
        out = model.lm_head.output.save()


def thread_count(model, backend):
    with model.trace(PROMPT, backend=backend):
        torch.set_num_threads(2)
        out = model.lm_head.output.save()


ATTACKS = [
    autocast_left_on, grad_mode_left_off, inference_mode_left_on, reseed_rng, deterministic_mode,
    matmul_precision, default_dtype, thread_count,
]


# The same `with` blocks, held open by generators that sit in a reference cycle: nothing frees
# them when the request's variables go, so the cyclic collector does, on whichever thread runs
# it. On the runtime's caller thread, an inference-mode guard made on the request thread puts
# that thread's dispatch state (the write guard's key included) onto the caller thread, and the
# generators' own code runs there, outside the dispatch guard.


def inference_mode_in_a_cycle(model, backend):
    def hold(flag):
        with torch.inference_mode(flag):
            yield 1

    with model.trace(PROMPT, backend=backend):
        first = hold(True)
        next(first)
        box = [first]
        box.append(box)
        out = model.lm_head.output.save()


def grad_modes_in_a_cycle(model, backend):
    def hold(ctx):
        with ctx:
            yield 1

    with model.trace(PROMPT, backend=backend):
        box = []
        for ctx in (torch.no_grad(), torch.enable_grad(), torch.no_grad()):
            held = hold(ctx)
            next(held)
            box.append(held)
        box.append(box)
        out = model.lm_head.output.save()


def autocast_in_a_cycle_nested(model, backend):
    def hold(flag):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=flag):
            with torch.inference_mode(True):
                yield 1

    with model.trace(PROMPT, backend=backend):
        box = [hold(True), hold(False)]
        for held in box:
            next(held)
        box.append(box)
        out = model.lm_head.output.save()


def finally_loops_after_the_request(model, backend):
    # a generator whose cleanup loops forever: run on the caller thread, it would wedge it
    def hold():
        try:
            yield 1
        finally:
            while True:
                pass

    with model.trace(PROMPT, backend=backend):
        held = hold()
        next(held)
        box = [held]
        box.append(box)
        out = model.lm_head.output.save()


def cycle_left_by_a_stopped_request(model, backend):
    # the request times out with the cycle alive; its thread is retired after the stop
    def hold(flag):
        with torch.inference_mode(flag):
            yield 1

    with model.trace(PROMPT, backend=backend):
        held = hold(True)
        next(held)
        box = [held]
        box.append(box)
        while True:
            pass


# Programs whose objects outlive the request in a reference cycle (checked on the caller thread too).
IN_A_CYCLE = [
    inference_mode_in_a_cycle, grad_modes_in_a_cycle, autocast_in_a_cycle_nested, finally_loops_after_the_request,
    cycle_left_by_a_stopped_request,
]

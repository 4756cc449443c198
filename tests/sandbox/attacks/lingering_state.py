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

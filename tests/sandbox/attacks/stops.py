"""Constructs that would absorb the request's stop: flow out of `finally`."""
# ruff: noqa: F841, B007, B012

from sandbox.attacks import PROMPT


def finally_continue(model, backend):
    with model.trace(PROMPT, backend=backend):
        while True:
            try:
                pass
            finally:
                continue
        out = model.lm_head.output.save()


def finally_break_in_for(model, backend):
    with model.trace(PROMPT, backend=backend):
        for _ in range(10**12):
            try:
                while True:
                    pass
            finally:
                break
        out = model.lm_head.output.save()


def finally_return_in_helper(model, backend):
    with model.trace(PROMPT, backend=backend):

        def absorb():
            try:
                while True:
                    pass
            finally:
                return 0

        while True:
            absorb()
        out = model.lm_head.output.save()


def nested_finally_continue(model, backend):
    with model.trace(PROMPT, backend=backend):
        while True:
            try:
                pass
            finally:
                if True:
                    try:
                        pass
                    except Exception:
                        pass
                    continue
        out = model.lm_head.output.save()


def finally_continue_with_except(model, backend):
    with model.trace(PROMPT, backend=backend):
        while True:
            try:
                while True:
                    pass
            except Exception:
                pass
            finally:
                continue
        out = model.lm_head.output.save()


def lambda_loop_finally(model, backend):
    with model.trace(PROMPT, backend=backend):
        for i in iter(int, 1):
            try:
                pass
            finally:
                continue
        out = model.lm_head.output.save()


ATTACKS = [finally_continue, finally_break_in_for, finally_return_in_helper, nested_finally_continue,
           finally_continue_with_except, lambda_loop_finally]

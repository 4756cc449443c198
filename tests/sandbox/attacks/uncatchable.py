"""Programs that try to outlive their timeout: each is allowed by the compile policy and would
keep the request thread busy after the stop (absorbing it, re-entering work from cleanup code, or
sitting in a C call), so only a stop that cannot be caught ends them."""
# ruff: noqa: F841, B007

import itertools
import time

from sandbox.attacks import PROMPT


def finally_recurses(model, backend):
    with model.trace(PROMPT, backend=backend):

        def spin():
            try:
                while True:
                    pass
            finally:
                spin()  # every stop lands in a loop, and its cleanup starts the next one

        spin()
        out = model.lm_head.output.save()


def try_finally_tree(model, backend):
    with model.trace(PROMPT, backend=backend):

        def grow(depth):
            try:
                if depth < 60:
                    grow(depth + 1)
            finally:
                if depth < 60:
                    grow(depth + 1)  # 2**60 calls: each stop unwinds one branch, the next starts

        grow(0)
        out = model.lm_head.output.save()


def generator_cleanup_loops(model, backend):
    with model.trace(PROMPT, backend=backend):

        def stream():
            try:
                while True:
                    yield 1
            finally:  # runs when the stop unwinds the consumer and the generator is closed
                for again in stream():  # ... and starts a fresh stream, closed the same way
                    pass

        for item in stream():
            pass
        out = model.lm_head.output.save()


def exit_returning_true(model, backend):
    with model.trace(PROMPT, backend=backend):

        class Quiet:
            def __enter__(self):
                return self

            def __exit__(self, *exc):  # would suppress whatever the block raised, the stop included
                return True

        while True:
            with Quiet():
                while True:
                    pass
        out = model.lm_head.output.save()


def library_context_manager_and_dunder(model, backend):
    with model.session(backend=backend):

        class Quiet:
            def __eq__(self, other):  # an allowed dunder, called from C (list.count)
                while True:
                    pass

        q = Quiet()
        while True:
            try:
                with model.trace(PROMPT):  # nnsight's own __exit__ sees the stop first
                    while True:
                        pass
            except Exception:
                pass
            [q, q].count(Quiet())
        out = model.lm_head.output.save()


def comprehension_spin(model, backend):
    with model.trace(PROMPT, backend=backend):
        total = sum([x for x in itertools.count() if x < 0])  # a loop with no statement in it
        out = model.lm_head.output.save()


def nested_comprehension_in_finally(model, backend):
    with model.trace(PROMPT, backend=backend):
        while True:
            try:
                while True:
                    pass
            finally:
                spin = [[y for y in itertools.count() if y < 0] for x in range(2)]
        out = model.lm_head.output.save()


def recursion_error_handler(model, backend):
    with model.trace(PROMPT, backend=backend):

        def deep(n):
            try:
                return deep(n + 1)
            except Exception:  # RecursionError: caught at every level, and the recursion restarts
                return deep(n + 1)

        deep(0)
        out = model.lm_head.output.save()


def catch_in_a_hook(model, backend):
    with model.session(backend=backend):
        while True:
            try:
                with model.trace(PROMPT):
                    h = model.model.layers[0].output
                    while True:  # runs inside nnsight's hook, on a mediator greenlet
                        pass
            except Exception:  # whatever nnsight turns the stop into
                pass
        out = model.lm_head.output.save()


def long_sleep(model, backend):
    with model.trace(PROMPT, backend=backend):
        time.sleep(10**6)  # one C call: no bytecode for an asynchronous stop to land on
        out = model.lm_head.output.save()


def sleeps_in_finally(model, backend):
    with model.trace(PROMPT, backend=backend):
        while True:
            try:
                time.sleep(10**6)
            finally:
                time.sleep(10**6)
        out = model.lm_head.output.save()


def lambda_recursion(model, backend):
    with model.trace(PROMPT, backend=backend):
        spin = lambda f: f(f)  # noqa: E731  (a lambda has no statement to guard)
        while True:
            try:
                spin(spin)
            except Exception:
                pass
        out = model.lm_head.output.save()


ATTACKS = [finally_recurses, try_finally_tree, generator_cleanup_loops, exit_returning_true,
           library_context_manager_and_dunder, comprehension_spin, nested_comprehension_in_finally,
           recursion_error_handler, catch_in_a_hook, long_sleep, sleeps_in_finally, lambda_recursion]

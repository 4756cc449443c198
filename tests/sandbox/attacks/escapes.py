"""Type-graph walks, function globals, frame walking, format strings, builtins."""
# ruff: noqa: B009, F841

import einops
import torch

from sandbox.attacks import PROMPT, TARGET


def subclasses_walk(model, backend):
    with model.trace(PROMPT, backend=backend):
        classes = ().__class__.__base__.__subclasses__()
        out = model.lm_head.output.save()


def subclasses_via_getattr(model, backend):
    with model.trace(PROMPT, backend=backend):
        cls = getattr((), "__class__")
        out = model.lm_head.output.save()


def mro_walk(model, backend):
    with model.trace(PROMPT, backend=backend):
        base = int.mro()[-1]
        out = model.lm_head.output.save()


def function_globals(model, backend):
    with model.trace(PROMPT, backend=backend):
        g = einops.rearrange.__globals__
        out = model.lm_head.output.save()


def function_globals_via_getattr(model, backend):
    with model.trace(PROMPT, backend=backend):
        g = getattr(einops.rearrange, "__glo" + "bals__")
        out = model.lm_head.output.save()


def generator_frame(model, backend):
    with model.trace(PROMPT, backend=backend):
        gen = (x for x in [1, 2])
        frame = gen.gi_frame.f_back
        out = model.lm_head.output.save()


def generator_frame_via_getattr(model, backend):
    with model.trace(PROMPT, backend=backend):
        gen = (x for x in [1, 2])
        frame = getattr(gen, "gi_" + "frame")
        out = model.lm_head.output.save()


def traceback_frame(model, backend):
    with model.trace(PROMPT, backend=backend):
        zero = 0
        try:
            1 / zero
        except Exception as exc:
            tb = exc.__traceback__.tb_frame.f_globals
        out = model.lm_head.output.save()


def sys_getframe(model, backend):
    with model.trace(PROMPT, backend=backend):
        import sys

        frame = sys._getframe(0)
        out = model.lm_head.output.save()


def format_string_walk(model, backend):
    with model.trace(PROMPT, backend=backend):
        leak = f"{einops.rearrange.__class__.__init__.__globals__}"
        out = model.lm_head.output.save()


def format_map_walk(model, backend):
    with model.trace(PROMPT, backend=backend):
        leak = "{x.__class__}".format_map({"x": model})
        out = model.lm_head.output.save()


def string_formatter(model, backend):
    with model.trace(PROMPT, backend=backend):
        import string

        leak = string.Formatter().get_field("0.__class__", [model], {})
        out = model.lm_head.output.save()


def type_builtin(model, backend):
    with model.trace(PROMPT, backend=backend):
        t = type(model)
        out = model.lm_head.output.save()


def eval_builtin(model, backend):
    with model.trace(PROMPT, backend=backend):
        eval("__import__('os').system('touch " + TARGET + "')")
        out = model.lm_head.output.save()


def exec_builtin(model, backend):
    with model.trace(PROMPT, backend=backend):
        exec("import os")
        out = model.lm_head.output.save()


def globals_builtin(model, backend):
    with model.trace(PROMPT, backend=backend):
        g = globals()
        out = model.lm_head.output.save()


def vars_builtin(model, backend):
    with model.trace(PROMPT, backend=backend):
        v = vars(model)
        out = model.lm_head.output.save()


def operator_attrgetter(model, backend):
    with model.trace(PROMPT, backend=backend):
        import operator

        get = operator.attrgetter("__class__")
        out = model.lm_head.output.save()


def subclass_module(model, backend):
    with model.trace(PROMPT, backend=backend):

        class Evil(torch.nn.Linear):
            pass

        out = model.lm_head.output.save()


def private_attribute(model, backend):
    with model.trace(PROMPT, backend=backend):
        inner = model._module
        out = model.lm_head.output.save()


def attack_in_invoke(model, backend):
    # Inner `with` blocks are compiled by nnsight at run time: they must be restricted too.
    with model.trace(backend=backend) as tracer:
        with tracer.invoke(PROMPT):
            classes = ().__class__.__base__.__subclasses__()
            out = model.lm_head.output.save()


def leak_secret(model, backend):
    with model.trace(PROMPT, backend=backend):
        import os

        secret = os.environ["NDIF_SANDBOX_TEST_SECRET"]
        out = model.lm_head.output.save()


def shipped_helper_escape(model, backend):
    with model.trace(PROMPT, backend=backend):
        out = helper_with_dunder(model.lm_head.output).save()


def helper_with_dunder(x):
    return x.__class__.__mro__


def shipped_helper_opens_file(model, backend):
    with model.trace(PROMPT, backend=backend):
        out = helper_writes_file(model.lm_head.output).save()


def helper_writes_file(x):
    with open(TARGET, "w") as f:
        f.write("pwned")
    return x


def tracer_execute_code(model, backend):
    # A code object plus tracer.execute would run unrestricted bytecode.
    with model.trace(PROMPT, backend=backend) as tracer:
        code = tracer.info.code
        tracer.execute(code.replace(co_names=("system",)))
        out = model.lm_head.output.save()


def tracer_execute_direct(model, backend):
    with model.trace(PROMPT, backend=backend) as tracer:
        run = tracer.execute
        out = model.lm_head.output.save()


def nested_remote_trace(model, backend):
    # A body that opens its own remote trace would make the server an HTTP client.
    with model.session(backend=backend):
        with model.trace(PROMPT, remote=True):
            out = model.lm_head.output.save()


def envoy_edit(model, backend):
    with model.trace(PROMPT, backend=backend):
        edited = model.edit(inplace=True)
        out = model.lm_head.output.save()


def typing_eval_annotation(model, backend):
    # get_type_hints eval()s string annotations with the stock compiler: attribute walks again.
    with model.trace(PROMPT, backend=backend):
        import typing

        def victim(x: "().__class__.__base__.__subclasses__()"):
            return x

        hints = typing.get_type_hints(victim)
        out = model.lm_head.output.save()


def functools_update_wrapper(model, backend):
    # update_wrapper setattr()s onto any object, past the write guard (here: the shared tokenizer).
    with model.trace(PROMPT, backend=backend):
        import functools

        def donor(x):
            return x

        functools.update_wrapper(model.tokenizer, donor)
        out = model.lm_head.output.save()


ATTACKS = [
    subclasses_walk, subclasses_via_getattr, mro_walk, function_globals, function_globals_via_getattr,
    generator_frame, generator_frame_via_getattr, traceback_frame, sys_getframe, format_string_walk,
    format_map_walk, string_formatter, type_builtin, eval_builtin, exec_builtin, globals_builtin,
    vars_builtin, operator_attrgetter, subclass_module, private_attribute, attack_in_invoke,
    leak_secret, shipped_helper_escape, shipped_helper_opens_file, tracer_execute_code,
    tracer_execute_direct, nested_remote_trace, envoy_edit, typing_eval_annotation, functools_update_wrapper,
]

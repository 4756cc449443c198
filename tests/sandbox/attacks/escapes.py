"""Type-graph walks, function globals, frame walking, format strings, builtins."""
# ruff: noqa: F401, F841 (F401: the table's programs use the imports as their globals)

import einops
import torch

from sandbox.attacks import PROMPT, TARGET, in_trace


def attack_in_invoke(model, backend):
    # Inner `with` blocks are compiled by nnsight at run time: they must be restricted too.
    with model.trace(backend=backend) as tracer:
        with tracer.invoke(PROMPT):
            classes = ().__class__.__base__.__subclasses__()
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


IN_TRACE = in_trace(globals(), {
    "subclasses_walk": "classes = ().__class__.__base__.__subclasses__()",
    "subclasses_via_getattr": 'cls = getattr((), "__class__")',
    "mro_walk": "base = int.mro()[-1]",
    "function_globals": "g = einops.rearrange.__globals__",
    "function_globals_via_getattr": 'g = getattr(einops.rearrange, "__glo" + "bals__")',
    "generator_frame": """
        gen = (x for x in [1, 2])
        frame = gen.gi_frame.f_back
    """,
    "generator_frame_via_getattr": """
        gen = (x for x in [1, 2])
        frame = getattr(gen, "gi_" + "frame")
    """,
    "traceback_frame": """
        zero = 0
        try:
            1 / zero
        except Exception as exc:
            tb = exc.__traceback__.tb_frame.f_globals
    """,
    "sys_getframe": """
        import sys

        frame = sys._getframe(0)
    """,
    "format_string_walk": 'leak = f"{einops.rearrange.__class__.__init__.__globals__}"',
    "format_map_walk": 'leak = "{x.__class__}".format_map({"x": model})',
    "string_formatter": """
        import string

        leak = string.Formatter().get_field("0.__class__", [model], {})
    """,
    "type_builtin": "t = type(model)",
    "eval_builtin": """
        eval("__import__('os').system('touch " + TARGET + "')")
    """,
    "exec_builtin": 'exec("import os")',
    "globals_builtin": "g = globals()",
    "vars_builtin": "v = vars(model)",
    "operator_attrgetter": """
        import operator

        get = operator.attrgetter("__class__")
    """,
    "subclass_module": """
        class Evil(torch.nn.Linear):
            pass
    """,
    "private_attribute": "inner = model._module",
    "leak_secret": """
        import os

        secret = os.environ["NDIF_SANDBOX_TEST_SECRET"]
    """,
    "envoy_edit": "edited = model.edit(inplace=True)",
    # get_type_hints eval()s string annotations with the stock compiler: attribute walks again.
    "typing_eval_annotation": """
        import typing

        def victim(x: "().__class__.__base__.__subclasses__()"):
            return x

        hints = typing.get_type_hints(victim)
    """,
    # update_wrapper setattr()s onto any object, past the write guard (here: the shared tokenizer).
    "functools_update_wrapper": """
        import functools

        def donor(x):
            return x

        functools.update_wrapper(model.tokenizer, donor)
    """,
})


ATTACKS = [
    *IN_TRACE, attack_in_invoke, shipped_helper_escape, shipped_helper_opens_file, tracer_execute_code,
    tracer_execute_direct, nested_remote_trace,
]

"""Attack programs, one module per escape class; each function is one attack inside a trace.

Most attacks are a few statements inside one `with model.trace(PROMPT, backend=backend):` that
ends by saving the logits; a module lists those as a table of bodies and `in_trace` builds the
functions (one shared wrapper instead of a copy per attack). Attacks of another shape are
written out as functions. nnsight's client ships a `with` block's source, which it reads from
`linecache`: `in_trace` registers the generated source there under a name of its own.
Every attack targets `TARGET` (a path that must never appear) and the fake secret in the
environment.
"""

from __future__ import annotations

import linecache
import os
import textwrap
from collections.abc import Callable
from typing import Any

# One directory per test process: test runs that share the machine never remove each other's.
ATTACK_DIR = f"/tmp/ndif-sandbox-attack-{os.getpid()}"
TARGET = f"{ATTACK_DIR}/pwned"
PROMPT = "The Eiffel Tower is in the city of"


def in_trace(namespace: dict[str, Any], bodies: dict[str, str]) -> list[Callable[..., Any]]:
    """Build `def name(model, backend)` for each body: the body's statements inside
    `with model.trace(PROMPT, backend=backend):`, then `out = model.lm_head.output.save()`.

    The functions see `namespace` as their globals (the attack module's imports) and are put
    into it under their names, with the module's name as theirs; returns them in table order.
    """
    return _build(namespace, {
        name: "    with model.trace(PROMPT, backend=backend):\n"
              + textwrap.indent(textwrap.dedent(body).strip("\n"), " " * 8)
              + "\n        out = model.lm_head.output.save()\n"
        for name, body in bodies.items()
    })


def saved_in_trace(namespace: dict[str, Any], expressions: dict[str, str]) -> list[Callable[..., Any]]:
    """Build `def name(model, backend)` that saves one expression in a trace and returns it
    (what an attack reading memory it should not see gets back), as `in_trace` does."""
    return _build(namespace, {
        name: f"    with model.trace(PROMPT, backend=backend):\n        leak = ({expression}).save()\n    return leak\n"
        for name, expression in expressions.items()
    })


def _build(namespace: dict[str, Any], bodies: dict[str, str]) -> list[Callable[..., Any]]:
    module = str(namespace["__name__"])
    text = "\n\n".join(f"def {name}(model, backend):\n{body}" for name, body in bodies.items())
    # A name per table: a module may have several, and nnsight reads each block back by file name.
    filename = f"/attack-tables/{module.rsplit('.', 1)[-1]}-{len(_TABLES)}.py"
    _TABLES.append(filename)
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    made: dict[str, Any] = {}
    exec(compile(text, filename, "exec"), namespace, made)  # the table's own text
    built = []
    for name in bodies:
        function = made[name]
        function.__module__ = module
        namespace[name] = function
        built.append(function)
    return built


_TABLES: list[str] = []

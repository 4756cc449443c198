"""Load a program module under a file name only the client has, as a real server sees it.

A script that was edited or deleted, a notebook cell, or any file on the researcher's laptop is
absent from the server; the in-process harness would otherwise find the file on disk (the
server side shares this machine). `load(module)` compiles the module's text under
`/client-only/<name>`, registers that text in the client's `linecache` only (where nnsight's
client reads trace blocks and helper functions from), and returns the new module.
"""

from __future__ import annotations

import linecache
import os
import sys
import types

CLIENT_ONLY_DIR = "/client-only"


def load(module: types.ModuleType) -> types.ModuleType:
    assert module.__file__ is not None
    with open(module.__file__) as handle:
        text = handle.read()
    filename = f"{CLIENT_ONLY_DIR}/{os.path.basename(module.__file__)}"
    assert not os.path.exists(filename)
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    loaded = types.ModuleType(module.__name__.rsplit(".", 1)[-1] + "_client_only")
    loaded.__file__ = filename
    sys.modules.pop(loaded.__name__, None)  # not importable: helpers travel by value, as for a script
    exec(compile(text, filename, "exec"), loaded.__dict__)
    return loaded

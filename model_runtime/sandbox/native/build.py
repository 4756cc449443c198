"""Build the native write guard: `python -m model_runtime.sandbox.native.build`.

Compiles `write_guard.cpp` against the installed torch with ninja (torch.utils.cpp_extension)
into `_build/` next to this file, `tensor_identity.cpp` (the integrity check's identity
reader) into `_build/identity/`, and `state_reads.cpp` (global_state.py's change records) into
`_build/state/`. Idempotent: ninja rebuilds only when the source or the flags
change. The Makefile's install step and the runtime image run it; the runtime only loads the
result (native_guard.py) and never compiles.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "write_guard.cpp"
BUILD_DIR = HERE / "_build"
NAME = "ndif_write_guard"
IDENTITY_SOURCE = HERE / "tensor_identity.cpp"
IDENTITY_BUILD_DIR = BUILD_DIR / "identity"  # its own ninja file
IDENTITY_NAME = "ndif_tensor_identity"
STATE_SOURCE = HERE / "state_reads.cpp"
STATE_BUILD_DIR = BUILD_DIR / "state"
STATE_NAME = "ndif_state_reads"


def build(verbose: bool = False) -> Path:
    from torch.utils.cpp_extension import load

    BUILD_DIR.mkdir(exist_ok=True)
    load(name=NAME, sources=[str(SOURCE)], build_directory=str(BUILD_DIR), extra_cflags=["-O2"], verbose=verbose)
    IDENTITY_BUILD_DIR.mkdir(exist_ok=True)
    load(name=IDENTITY_NAME, sources=[str(IDENTITY_SOURCE)], build_directory=str(IDENTITY_BUILD_DIR),
         extra_cflags=["-O2"], verbose=verbose)
    STATE_BUILD_DIR.mkdir(exist_ok=True)
    load(name=STATE_NAME, sources=[str(STATE_SOURCE)], build_directory=str(STATE_BUILD_DIR),
         extra_cflags=["-O2"], verbose=verbose)
    return BUILD_DIR / f"{NAME}.so"


if __name__ == "__main__":
    print(build(verbose="-v" in sys.argv))

"""Local mode's meta-device fallback: the runtime-side evaluator as a subprocess, not a Job.

Local mode runs on a machine that has the runtime stack (torch, transformers) installed, so a
checkpoint without safetensors is sized by `python -m model_runtime.meta_evaluator` directly,
with the same arguments the operator's Job gets (`evaluation.meta_command`). A subprocess keeps
torch out of this process, as in the operator.
"""

from __future__ import annotations

import os
import subprocess
import sys

from ndif_operator.api import ModelSpec
from ndif_operator.evaluation import CacheEntry, EstimateError, entry_from_runtime_output
from ndif_operator.evaluation.meta_command import META_EVALUATOR_MODULE, meta_evaluator_args

TIMEOUT_S = 600.0


def run_meta_evaluator(model: ModelSpec, key: str, *, timeout: float = TIMEOUT_S) -> CacheEntry:
    """Size `model` on the meta device; raises EstimateError with the evaluator's own message."""
    command = [sys.executable, "-m", META_EVALUATOR_MODULE, *meta_evaluator_args(model, key)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        raise EstimateError(f"the meta-device evaluator did not finish in {timeout:.0f} s") from exc
    try:
        entry = entry_from_runtime_output(done.stdout)
    except ValueError as exc:
        tail = done.stderr.strip().splitlines()[-1:] if done.returncode else []
        raise EstimateError(f"{exc}{': ' + tail[0] if tail else ''}") from exc
    if entry.key != key:
        raise EstimateError(f"the meta-device evaluator sized {entry.key!r}, not {key!r}")
    return entry

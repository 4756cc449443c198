"""The sandbox untrusted nnsight requests run in (threat model in docs/security.md).

Layers, each its own module: `unpickling` (allowlisted deserialisation), `compiling` (the
RestrictedPython compile policy, request source under server-made names with `sources`),
`guards` (the run-time guard functions and builtins), `capabilities` (module proxies),
`model_guard` (weights and process state), `provenance` (the model's state read-only to requests),
`model_calls` (model-call keywords, batch and sequence limits), `gradients` (backward passes with
frozen weights), `dispatch_guard` (writes into server memory refused and uninitialised
allocations zeroed at torch's dispatcher), `global_state` (every torch/interpreter setting put
back after each request), `integrity` (weights fingerprinted after each request, restored or the
replica failed closed), `limits` (time, size, memory, seccomp); `executor` puts them together behind
`execute_sandboxed(model, blob, envelope, *, limits, on_log) -> ExecutionResult` and the
runtime's `run_blob`.
"""

from model_runtime.sandbox.errors import (
    CapabilityDenied,
    CodeRejected,
    LimitExceeded,
    ModelTampering,
    PayloadRejected,
    SandboxError,
)
from model_runtime.sandbox.executor import ExecutionResult, RequestFailed, Sandbox, execute_sandboxed
from model_runtime.sandbox.limits import Limits

__all__ = [
    "CapabilityDenied",
    "CodeRejected",
    "ExecutionResult",
    "LimitExceeded",
    "Limits",
    "ModelTampering",
    "PayloadRejected",
    "RequestFailed",
    "Sandbox",
    "SandboxError",
    "execute_sandboxed",
]

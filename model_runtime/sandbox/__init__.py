"""The sandbox untrusted nnsight requests run in (issue 6; threat model in docs/security.md).

Layers, each its own module: `unpickling` (allowlisted deserialisation), `compiling`
(RestrictedPython with live guards), `capabilities` (module proxies), `model_guard` (weights and
process state), `limits` (time, size, memory, seccomp); `executor` puts them together behind
`execute_sandboxed(model, blob, envelope, *, limits, on_log) -> ExecutionResult`.
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

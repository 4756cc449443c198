"""Real client payloads for sandbox tests: the unmodified nnsight client, a capturing backend.

`SandboxBackend` is a `RemoteBackend` whose `request()` serialises the trace exactly as the
client does for NDIF (`_serialize`), runs it through the production path in-process
(`model_runtime.replica.execution.execute_request` with the sandbox's runner, on the runtime's request
threads, with the sandbox configured from the request's `Limits` as a model replica configures
it), and decodes the result with the client's own `finalize()`. No Ray, no HTTP. An error comes
back as the exception class its `[layer]` prefix names (`RequestFailed` for the user's own
errors), so tests can tell which layer refused. `production=False` runs the standalone
`Sandbox.execute` instead (its meta reports the layers' timings and guard counts).
"""

from __future__ import annotations

import hashlib
from typing import Any

from nnsight.intervention.backends.remote import RemoteBackend

from model_runtime.replica.execution import Envelope, ExecutionLimits, execute_request
from model_runtime.sandbox import (
    CapabilityDenied,
    CodeRejected,
    LimitExceeded,
    Limits,
    ModelTampering,
    PayloadRejected,
    RequestFailed,
    Sandbox,
)
from model_runtime.sandbox.executor import SANDBOXED, configure

SECRET = "ndif-test-secret-3f9a1c"  # set in the environment; must never come back

_LAYERS = {cls.layer: cls for cls in (PayloadRejected, CodeRejected, CapabilityDenied, ModelTampering, LimitExceeded)}


def weights_digest(model: Any) -> str:
    """sha256 over the served model's state dict, byte for byte."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model._module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def raise_for(error: str, timed_out: bool) -> None:
    """The exception a sandboxed error text stands for."""
    if timed_out:
        raise LimitExceeded(error)
    if error.startswith("[") and "]" in error:
        layer = error[1 : error.index("]")]
        if layer in _LAYERS:
            raise _LAYERS[layer](error[error.index("]") + 2 :])
    raise RequestFailed(error)


class SandboxBackend(RemoteBackend):
    def __init__(self, client: Any, server: Any, sandbox: Sandbox, limits: Limits | None = None,
                 production: bool = True) -> None:
        super().__init__(client.to_model_key(), host="http://sandbox.invalid", env=client._remoteable_get_env())
        self.server = server
        self.sandbox = sandbox
        self.limits = limits
        self.production = production
        self.logs: list[str] = []
        self.blob: bytes | None = None
        self.meta_out: dict[str, Any] = {}
        self.outcome: Any = None  # the production path's ExecutionResult

    def request(self, request: Any, tracer: Any) -> Any:
        self.blob = self._serialize(tracer)
        if not self.production:
            result = self.sandbox.execute(
                self.server, self.blob, request, limits=self.limits, on_log=self.logs.append
            )
            self.meta_out = result.meta
            return self.finalize(result.result)
        limits = self.limits or self.sandbox.limits
        configure(limits)
        envelope = Envelope(model_key=request.model_key, compress=request.compress, env=request.env)
        outcome = execute_request(
            self.server, self.blob, envelope,
            limits=ExecutionLimits(timeout_seconds=limits.timeout_s, max_result_bytes=limits.max_result_bytes,
                                   cancel_grace_seconds=limits.grace_s),
            on_log=self.logs.append, runner=SANDBOXED,
        )
        self.meta_out = outcome.meta
        self.outcome = outcome
        if outcome.error is not None:
            raise_for(outcome.error, outcome.timed_out)
        return self.finalize(outcome.result)

"""Real client payloads for sandbox tests: the unmodified nnsight client, a capturing backend.

`SandboxBackend` is a `RemoteBackend` whose `request()` serialises the trace exactly as the
client does for NDIF (`_serialize`), hands the blob and envelope to the sandbox in-process, and
decodes the result with the client's own `finalize()`. No Ray, no HTTP.
"""

from __future__ import annotations

import hashlib
from typing import Any

from nnsight.intervention.backends.remote import RemoteBackend

from model_runtime.sandbox import Limits, Sandbox

SECRET = "ndif-test-secret-3f9a1c"  # set in the environment; must never come back


def weights_digest(model: Any) -> str:
    """sha256 over the served model's state dict, byte for byte."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model._module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class SandboxBackend(RemoteBackend):
    def __init__(self, client: Any, server: Any, sandbox: Sandbox, limits: Limits | None = None) -> None:
        super().__init__(client.to_model_key(), host="http://sandbox.invalid", env=client._remoteable_get_env())
        self.server = server
        self.sandbox = sandbox
        self.limits = limits
        self.logs: list[str] = []
        self.blob: bytes | None = None
        self.meta_out: dict[str, Any] = {}

    def request(self, request: Any, tracer: Any) -> Any:
        self.blob = self._serialize(tracer)
        result = self.sandbox.execute(
            self.server, self.blob, request, limits=self.limits, on_log=self.logs.append
        )
        self.meta_out = result.meta
        return self.finalize(result.result)

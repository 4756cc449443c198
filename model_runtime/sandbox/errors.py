"""The errors the sandbox raises: each names the layer that refused, so a user sees why."""

from __future__ import annotations

_MAX_MESSAGE_CHARS = 4096


class SandboxError(Exception):
    """A request did something the sandbox forbids. The message is safe to show the user."""

    layer = "sandbox"

    def __init__(self, message: str) -> None:
        # Messages echo request-chosen text (an attribute name, a module name): bounded, so a
        # 100 MB name does not become a 100 MB error for the gateway to keep.
        if len(message) > _MAX_MESSAGE_CHARS:
            message = message[: _MAX_MESSAGE_CHARS // 2] + " [...] " + message[-_MAX_MESSAGE_CHARS // 2 :]
        super().__init__(f"[{self.layer}] {message}")


class PayloadRejected(SandboxError):
    """The blob holds something the allowlisted unpickler refuses to build."""

    layer = "deserialisation"


class CodeRejected(SandboxError):
    """The trace body or a shipped function uses syntax or names the restricted compiler refuses."""

    layer = "code"


class CapabilityDenied(SandboxError):
    """User code reached for a module, attribute or call outside its capabilities."""

    layer = "capabilities"


class ModelTampering(SandboxError):
    """User code tried to change the model's weights, buffers or modules."""

    layer = "model"


class LimitExceeded(SandboxError):
    """A size, time or memory limit was hit."""

    layer = "limits"


class RequestTimeout(BaseException):
    """Injected into the worker thread when a request runs past its time limit.

    A BaseException, not an Exception, and not reachable by name from user code, so a
    sandboxed ``except Exception`` (the widest handler the compiler lets through) cannot
    swallow it.
    """

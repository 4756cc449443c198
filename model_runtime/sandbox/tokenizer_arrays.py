"""A tokenizer called by request code returns torch tensors or Python lists, never numpy arrays.

numpy's kernels cannot be priced or stopped, so numpy values are kept from request code
(`capabilities.is_numpy`). A tokenizer can make them itself (`return_tensors="np"`), and a
container it returns can be unpacked by C builtins (`dict(...).values()`, `map`) that no guard
sees. Every tokenizer path that makes arrays goes through `BatchEncoding.convert_to_tensors`, so
that one method refuses any tensor type but torch's while a request runs on the thread: the source
is closed, not each way of reaching what it returned. nnsight and the server (not sandboxed)
are unaffected.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from model_runtime.sandbox.capabilities import NUMPY_REFUSAL
from model_runtime.sandbox.compiling import is_sandboxed
from model_runtime.sandbox.errors import CapabilityDenied

_LOCK = threading.Lock()
_INSTALLED = False


def refuse_foreign_tensor_types() -> None:
    """Wrap `BatchEncoding.convert_to_tensors` once per process (idempotent)."""
    global _INSTALLED
    with _LOCK:
        if _INSTALLED:
            return
        from transformers.tokenization_utils_base import BatchEncoding
        from transformers.utils.generic import TensorType

        original = BatchEncoding.convert_to_tensors

        @functools.wraps(original)
        def convert_to_tensors(self: Any, tensor_type: Any = None, *args: Any, **kwargs: Any) -> Any:
            if tensor_type is not None and is_sandboxed() and TensorType(tensor_type) != TensorType.PYTORCH:
                raise CapabilityDenied(f'return_tensors="{TensorType(tensor_type).value}" is not available: '
                                       f'use return_tensors="pt" (or none, for lists). {NUMPY_REFUSAL}')
            return original(self, tensor_type, *args, **kwargs)

        BatchEncoding.convert_to_tensors = convert_to_tensors  # type: ignore[method-assign]
        _INSTALLED = True

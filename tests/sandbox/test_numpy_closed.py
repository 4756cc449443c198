"""numpy is not offered to request code: its kernels run as single C calls that neither the
request's stop nor the native guard's work pricing reaches. Importing it, and every route to an
ndarray (`.numpy()`, `einops.asnumpy`, a tokenizer's `return_tensors="np"`), is refused with the
reason and the torch alternative; the torch spelling of the same work runs.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from model_runtime.sandbox import SandboxError
from model_runtime.sandbox.capabilities import WEDGE_HOOK_ENV
from sandbox.attacks import PROMPT, in_trace
from sandbox.harness import weights_digest

NUMPY_ROUTES = in_trace(globals(), {
    "import_numpy": "import numpy",
    "import_numpy_linalg": "import numpy.linalg",
    "from_numpy_import": "from numpy.linalg import eigvals",
    "numpy_eigvals": """
        import numpy

        numpy.linalg.eigvals(numpy.ones((4000, 4000)))
    """,
    "tensor_numpy": "a = model.lm_head.output.detach().numpy()",
    "unbound_tensor_numpy": "a = torch.Tensor.numpy(torch.ones(3))",
    "einops_asnumpy": """
        import einops

        a = einops.asnumpy(torch.ones(3))
    """,
    "tokenizer_np_item": 'a = model.tokenizer("hello", return_tensors="np")["input_ids"]',
    "tokenizer_np_attribute": 'a = model.tokenizer("hello", return_tensors="np").input_ids',
    # unpacked by C builtins that no guard sees: the tokenizer itself refuses to make the arrays
    "tokenizer_np_values_loop": """
        for v in dict(model.tokenizer(["a b", "c d"], return_tensors="np")).values():
            r = v @ v
    """,
    "tokenizer_np_map": """
        r = list(map(lambda v: v * 2, dict(model.tokenizer("hello", return_tensors="np")).values()))
    """,
})


@pytest.mark.parametrize("program", NUMPY_ROUTES, ids=lambda p: p.__name__)
def test_numpy_is_refused_with_reason_and_alternative(program: Any, models: tuple[Any, Any], backend: Any) -> None:
    client, server = models
    before = weights_digest(server)
    with pytest.raises(SandboxError) as info:
        program(client, backend())
    message = str(info.value)
    assert "numpy" in message and "stop" in message and "torch" in message, message
    assert weights_digest(server) == before


def _torch_equivalents(model: Any, backend: Any) -> Any:
    with model.trace(PROMPT, backend=backend):
        ids = model.tokenizer("hello", return_tensors="pt")["input_ids"]
        eig = torch.linalg.eigvals(torch.ones((8, 8)))
        out = (ids.sum() + eig.real.sum()).save()
    return out


def test_torch_equivalents_run(models: tuple[Any, Any], backend: Any) -> None:
    assert torch.is_tensor(_torch_equivalents(models[0], backend()))


def _wedge_hook(model: Any, backend: Any) -> None:
    with model.trace(PROMPT, backend=backend):
        from model_runtime.sandbox.wedge_hook import block

        block(60)


def test_the_test_only_wedge_hook_is_unreachable_without_its_variable(models: tuple[Any, Any], backend: Any,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WEDGE_HOOK_ENV, raising=False)
    with pytest.raises(SandboxError, match="not available"):
        _wedge_hook(models[0], backend())

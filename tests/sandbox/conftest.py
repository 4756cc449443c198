"""One tiny llama per session: a dispatched server model, a meta client model, one sandbox.

After loading models, the fixtures do what a model replica does after a load
(`model_runtime/replica/app.py`): collect once and `gc.freeze()` the survivors
(`freeze_long_lived`). Requests then pay the replica's per-request collection of young objects,
not a full collection over everything pytest, torch and the models hold (~0.5 s per request here).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from model_runtime.replica.garbage import freeze_long_lived
from sandbox.harness import SECRET


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_runtime.tiny_models import build_tiny_model

    path = tmp_path_factory.mktemp("sandbox") / "tiny-llama"
    build_tiny_model("llama", path)
    return path


@pytest.fixture(scope="session")
def models(tiny_path: Path) -> Iterator[tuple[Any, Any]]:
    import nnsight
    import nnsight.modeling.huggingface as hf
    from transformers import AutoTokenizer

    os.environ["NDIF_SANDBOX_TEST_SECRET"] = SECRET
    hf._ID_CACHE[str(tiny_path)] = str(tiny_path)  # offline model key
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    client = nnsight.TransformersModel(str(tiny_path), task="text-generation", tokenizer=tokenizer, dispatch=False)
    server = nnsight.TransformersModel(
        str(tiny_path), task="text-generation", tokenizer=tokenizer, device_map="cpu", dispatch=True
    )
    server._module.requires_grad_(False)
    freeze_long_lived()
    yield client, server


@pytest.fixture(scope="session")
def local_model(tiny_path: Path) -> Any:
    """An ordinary local model (weights not frozen), the reference for research programs."""
    import nnsight

    model = nnsight.TransformersModel(str(tiny_path), task="text-generation", device_map="cpu", dispatch=True)
    freeze_long_lived()
    return model


_ARCH_MODELS: dict[str, tuple[Any, Any, Any]] = {}


@pytest.fixture(scope="session")
def arch_models(tmp_path_factory: pytest.TempPathFactory, models: tuple[Any, Any], local_model: Any
                ) -> Callable[[str], tuple[Any, Any, Any]]:
    """(client, frozen server, ordinary local) for a tiny architecture, built once per session."""

    def get(arch: str) -> tuple[Any, Any, Any]:
        if arch == "llama":
            return models[0], models[1], local_model
        if arch not in _ARCH_MODELS:
            import nnsight
            import nnsight.modeling.huggingface as hf
            from transformers import AutoTokenizer

            from model_runtime.tiny_models import build_tiny_model

            path = tmp_path_factory.mktemp("sandbox") / f"tiny-{arch}"
            build_tiny_model(arch, path)  # type: ignore[arg-type]
            hf._ID_CACHE[str(path)] = str(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
            client = nnsight.TransformersModel(str(path), task="text-generation", tokenizer=tokenizer, dispatch=False)
            server = nnsight.TransformersModel(
                str(path), task="text-generation", tokenizer=tokenizer, device_map="cpu", dispatch=True
            )
            server._module.requires_grad_(False)
            local = nnsight.TransformersModel(str(path), task="text-generation", device_map="cpu", dispatch=True)
            _ARCH_MODELS[arch] = (client, server, local)
            freeze_long_lived()
        return _ARCH_MODELS[arch]

    return get


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Any]:
    from model_runtime.sandbox import Limits, Sandbox

    box = Sandbox(Limits(timeout_s=10.0, memory_bytes=2 * 1024**3, max_result_bytes=4 * 1024**2))
    yield box
    if box._worker is not None:
        box._worker.stop()


@pytest.fixture()
def backend(models: tuple[Any, Any], sandbox: Any) -> Callable[..., Any]:
    from sandbox.harness import SandboxBackend

    client, server = models

    def make(**kwargs: Any) -> SandboxBackend:
        return SandboxBackend(client, server, sandbox, **kwargs)

    return make

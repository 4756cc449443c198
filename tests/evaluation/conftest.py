"""Tiny real checkpoints, built once per session (a few hundred KB each, ~1 s in all)."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_runtime.tiny_models import build_tiny_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        "llama": build_tiny_model("llama", root / "llama"),
        "gpt2": build_tiny_model("gpt2", root / "gpt2"),
        "llama-tied": build_tiny_model("llama-tied", root / "llama-tied"),
        "llama-sharded": build_tiny_model("llama", root / "llama-sharded", max_shard_size="100KB"),
        "gpt2-bin": build_tiny_model("gpt2", root / "gpt2-bin", safe_serialization=False),
    }


"""The API package's curated surface, its names, and the import boundary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ndif_operator.api as api
from ndif_operator.api.naming import model_app_name, model_key


def test_all_lists_exactly_the_public_names() -> None:
    # Submodules are lower-case; every upper-case name is a deliberate export, and nothing else is.
    public = {n for n in vars(api) if not n.startswith("_") and n[0].isupper()}
    assert set(api.__all__) == public
    assert len(api.__all__) == len(set(api.__all__))


def test_model_app_names_are_stable_safe_and_unique() -> None:
    assert model_app_name("ndif", "gpt2") == "md-ndif-gpt2"
    long = model_app_name("namespace-" * 5, "name-" * 10)
    assert len(long) <= 63 and long == model_app_name("namespace-" * 5, "name-" * 10)
    assert model_app_name("a", "b.c") != model_app_name("a", "b-c")  # unsafe chars never collide
    assert model_key("Meta-Llama/Llama-3.1-8B") == "meta-llama/llama-3.1-8b"


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {name.split(".")[0] for name in out.split()}


def test_importing_the_operator_imports_no_ml_stack() -> None:
    loaded = _imported_after("import ndif_operator, ndif_operator.api, ndif_operator.cli")
    assert not loaded & {"torch", "ray", "nnsight", "transformers", "accelerate"}


def test_the_api_imports_no_kubernetes_stack() -> None:
    # model_runtime imports ndif_operator.api; it must not drag kopf or the Kubernetes client along.
    loaded = _imported_after("import ndif_operator.api")
    assert not loaded & {"kopf", "kubernetes", "kubernetes_asyncio", "torch", "ray"}


def test_import_contracts_hold() -> None:
    # The console script next to this interpreter (`python -m importlinter.cli` runs nothing).
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint_imports)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout

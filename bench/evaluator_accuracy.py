"""How the evaluator's weights estimate compares with what a real load holds.

    .venv/bin/python bench/evaluator_accuracy.py

For each model (tiny ones from model_runtime.tiny_models and two small random-weight models of
~50M parameters built here from configs), it estimates from the checkpoint headers, then in a fresh
process loads the model on CPU (float32) and counts the parameter + buffer bytes it holds: the
estimate must equal them exactly. The runtime budget on top of the weights is measured through the
replica's own trace path by `bench/budget.py`. The last line is the headline.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from ndif_operator.api import DType, LocalPathSource, ModelSource, ModelSpec
from ndif_operator.evaluation import evaluate

_MEASURE_ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin", "HF_HUB_OFFLINE": "1"}

_MEASURE = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
weights += sum(b.numel() * b.element_size() for b in model.buffers())
print(json.dumps({"weights": weights}))
"""


def build_models(root: Path) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from model_runtime.tiny_models import build_tiny_model

    models = {arch: build_tiny_model(arch, root / arch) for arch in ("llama", "gpt2", "llama-tied")}  # type: ignore[arg-type]
    configs = {
        "llama-56m": LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048),
        "gpt2-51m": GPT2Config(vocab_size=50257, n_embd=512, n_layer=8, n_head=8, n_positions=1024),
    }
    for name, config in configs.items():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(root / name)
        models[name] = root / name
    return models


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in build_models(Path(tmp)).items():
            spec = ModelSpec(repo_id=f"bench/{name}", dtype=DType.FLOAT32,
                             source=ModelSource(local_path=LocalPathSource(path=str(path))))
            entry = evaluate(spec, now=__import__("datetime").datetime.now())
            out = subprocess.run([sys.executable, "-c", _MEASURE, str(path)],
                                 capture_output=True, text=True, check=True, env=_MEASURE_ENV)
            measured = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((name, entry.weights_bytes, measured["weights"]))
    print(f"{'model':12} {'weights est':>12} {'measured':>12} {'exact':>5}")
    for name, est, real in rows:
        print(f"{name:12} {est:12d} {real:12d} {est == real!s:>5}")
    exact = sum(1 for r in rows if r[1] == r[2])
    print(f"headline: weights exact on {exact}/{len(rows)} models")


if __name__ == "__main__":
    main()

"""How the evaluator's estimate compares with memory measured after a real load and forward pass.

    .venv/bin/python bench/evaluator_accuracy.py

For each model (tiny ones from model_runtime.tiny_models and two small random-weight models of
~50M parameters built here from configs), it estimates from the checkpoint headers, then in a fresh
process loads the model on CPU (float32) and measures:
- weights: parameter + buffer bytes of the loaded model (the estimate must equal it exactly);
- forward peak: the rise of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs just
  before the pass) during one `model(input_ids, output_hidden_states=True)` at the budget's batch
  and sequence, i.e. with the KV cache, logits and every layer's hidden state kept, as a trace that
  saves all layers does.
The baseline is the budget without the CUDA context constant (there is no CUDA here). Ratios are
budget / measured (>= 1 means the budget covered the real pass). The last line is the headline.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from ndif_operator.api import DType, LocalPathSource, ModelSource, ModelSpec, RuntimeLimits
from ndif_operator.evaluation import evaluate, runtime_budget

LIMITS = RuntimeLimits(max_batch_size=4, max_sequence_length=256)
# glibc keeps freed heap memory resident and raises its mmap threshold as big blocks are freed, so
# RSS would count every temporary ever allocated; a fixed threshold and no trim make RSS track the
# tensors alive at each moment, as the CUDA caching allocator's own peak does.
_MEASURE_ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin", "MALLOC_MMAP_THRESHOLD_": "65536",
                "MALLOC_TRIM_THRESHOLD_": "0", "HF_HUB_OFFLINE": "1"}

_MEASURE = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
path, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
weights += sum(b.numel() * b.element_size() for b in model.buffers())
ids = torch.randint(0, model.config.vocab_size, (batch, seq))
with torch.no_grad():
    model(ids[:, :8])  # warm the allocator and lazy inits
import gc; gc.collect()
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
before = status("VmRSS:")
with torch.no_grad():
    out = model(ids, output_hidden_states=True)
peak = status("VmHWM:")
print(json.dumps({"weights": weights, "forward_peak": peak - before}))
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
            assert entry.shape is not None
            budget = runtime_budget(entry.shape, LIMITS, entry.element_size)
            no_context = budget.total - budget.context
            out = subprocess.run(
                [sys.executable, "-c", _MEASURE, str(path), str(LIMITS.max_batch_size),
                 str(min(LIMITS.max_sequence_length, entry.shape.max_positions or 10**9))],
                capture_output=True, text=True, check=True, env=_MEASURE_ENV,
            )
            measured = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((name, entry.weights_bytes, measured["weights"], no_context, measured["forward_peak"]))
    mib = 1024**2
    print(f"limits: batch {LIMITS.max_batch_size}, sequence {LIMITS.max_sequence_length} (capped at the model's "
          "positions); float32 on CPU")
    print(f"{'model':12} {'weights est':>12} {'measured':>12} {'exact':>5} {'budget*':>10} {'fwd peak':>10} "
          f"{'budget/peak':>11}")
    for name, est, real, budget, peak in rows:
        print(f"{name:12} {est:12d} {real:12d} {est == real!s:>5} {budget / mib:9.1f}M {peak / mib:9.1f}M "
              f"{budget / max(peak, 1):11.2f}")
    print("* budget without the 512 MiB CUDA-context constant")
    exact = sum(1 for r in rows if r[1] == r[2])
    big = [r for r in rows if r[0] in ("llama-56m", "gpt2-51m")]
    print(f"headline: weights exact on {exact}/{len(rows)} models; budget / measured forward peak on the "
          f"~50M models: {', '.join(f'{r[0]} {r[3] / max(r[4], 1):.2f}x' for r in big)}")


if __name__ == "__main__":
    main()

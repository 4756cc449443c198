"""The runtime budget against the memory a replica really uses, on CPU, for several request shapes.

    .venv/bin/python bench/budget.py            # every shape, one subprocess each
    .venv/bin/python bench/budget.py b2-s512-v128k

For each shape a fresh subprocess (one torch thread):

1. builds a llama offline (`model_runtime.tiny_models`, hidden 512, 4 layers, 8 heads / 4 kv
   heads, the shape's vocabulary and maximum positions; two shapes' config.json asks for eager
   attention, as a checkpoint that forces it would; one shape is a GPT-2 of the same size);
2. sizes it with the operator's estimator (`ndif_operator.evaluation.estimate`: safetensors
   headers and config.json), for the shape's maxBatchSize / maxSequenceLength / maxResultBytes;
3. loads it with the replica's loader (`model_runtime.replica.loading.load_model`, which picks the
   attention implementation by the same rule the estimator sized for) and configures the sandbox
   with the same limits, as a replica does;
4. captures a real nnsight client payload (the unmodified client, `remote` backend capture) that
   runs a full batch of the shape and saves the embedding output, every layer's output and the
   logits, and runs it through the replica's seam (`execution.execute_request` with the sandboxed
   runner), once on a short warm-up payload, then measured;
5. measures the peak: the process's resident-set high-water mark (`VmHWM`, reset through
   `/proc/self/clear_refs`) read right after the trace, before the result is serialised (the
   serialised copy lives in host memory, never on the GPU), minus the resident set before the
   request. glibc is told to map every allocation above 64 KiB on its own
   (`MALLOC_MMAP_THRESHOLD_`), so freed tensors leave the resident set at once.

budget = the estimate's total minus the weights and the CUDA context (absent on CPU). The target
is budget / peak within [1.0, 1.25] for every shape. The LAST line is the headline:
`headline: budget/peak worst X.XX (lowest), highest Y.YY over N shapes; every shape within [1.00, 1.25]: yes`
(the lowest ratio is the worst: below 1.0 the budget under-covers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MIB = 1024**2
HIDDEN = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 8,
          "num_key_value_heads": 4}


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    sequence: int
    vocab: int
    dtype: str = "float32"
    eager: bool = False  # config.json asks for eager attention
    padded: bool = False  # prompts of different lengths: the batch is padded
    intermediate: int = HIDDEN["intermediate_size"]  # a wide MLP makes the layer phase the peak
    arch: str = "llama"  # or "gpt2": fused QKV projection, GELU MLP, learned positions


SHAPES = (
    Shape("b1-s8192-v32k", 1, 8192, 32000),
    Shape("b1-s4096-v32k", 1, 4096, 32000),
    Shape("b2-s512-v128k", 2, 512, 128256),
    Shape("b8-s1024-v32k-padded", 8, 1024, 32000, padded=True),
    Shape("b1-s2048-v128k-bf16", 1, 2048, 128256, dtype="bfloat16"),
    Shape("b2-s2048-v32k-eager", 2, 2048, 32000, eager=True),
    # The layer phase is the peak: the score matrix, then a wide MLP (3 x 16384 > the vocabulary).
    Shape("b1-s4096-v32k-eager", 1, 4096, 32000, eager=True),
    Shape("b4-s2048-v32k-wide-mlp", 4, 2048, 32000, intermediate=16384),
    Shape("gpt2-b4-s1024-v50k", 4, 1024, 50257, intermediate=2048, arch="gpt2"),
)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim() -> None:
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _build(shape: Shape, root: Path) -> Path:
    from model_runtime.tiny_models import build_tiny_model

    if shape.arch == "gpt2":
        overrides: dict[str, object] = {"n_embd": HIDDEN["hidden_size"], "n_layer": HIDDEN["num_hidden_layers"],
                                        "n_head": HIDDEN["num_attention_heads"], "n_inner": shape.intermediate,
                                        "n_positions": shape.sequence}
    else:
        overrides = {**HIDDEN, "intermediate_size": shape.intermediate, "max_position_embeddings": shape.sequence}
    path = build_tiny_model("gpt2" if shape.arch == "gpt2" else "llama", root / shape.name, dtype=shape.dtype,
                            config_overrides={**overrides, "vocab_size": shape.vocab})
    if shape.eager:
        config = json.loads((path / "config.json").read_text())
        config["attn_implementation"] = "eager"
        (path / "config.json").write_text(json.dumps(config))
    return path


def _payload(path: Path, shape: Shape, batch: int, sequence: int) -> tuple[Any, bytes]:
    """A real client payload: a full batch, saving the embeddings, every layer and the logits."""
    import nnsight
    import nnsight.modeling.huggingface as hf
    import torch
    from nnsight.intervention.backends.remote import RemoteBackend

    hf._ID_CACHE[str(path)] = str(path)
    client = nnsight.TransformersModel(str(path), task="text-generation", dispatch=False)
    captured: list[tuple[Any, bytes]] = []

    class Capture(RemoteBackend):
        def request(self, request: Any, tracer: Any) -> Any:
            captured.append((request, self._serialize(tracer)))
            return {}

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 290, (batch, sequence), generator=generator)
    mask = torch.ones(batch, sequence, dtype=torch.long)
    if shape.padded and batch > 1:
        mask[-1, : sequence // 4] = 0  # left padding: the last prompt is shorter
    backend = Capture(client.to_model_key(), host="http://bench.invalid", env=client._remoteable_get_env())
    # Module envoys picked before the trace: its body must reference nothing of this script's own.
    gpt2 = shape.arch == "gpt2"
    embed = client.transformer.wte if gpt2 else client.model.embed_tokens
    layers = client.transformer.h if gpt2 else client.model.layers
    with client.trace({"input_ids": ids, "attention_mask": mask}, backend=backend):
        embeddings = embed.output.save()  # noqa: F841 - only the payload matters
        hidden = [layer.output.save() for layer in layers]  # noqa: F841
        logits = client.lm_head.output.save()  # noqa: F841
    return captured[0]


def measure(shape: Shape) -> dict[str, Any]:
    """Run in the subprocess: budget and measured peak for `shape`."""
    import torch

    torch.set_num_threads(1)
    from model_runtime.replica import execution
    from model_runtime.replica.loading import load_model
    from model_runtime.sandbox.executor import configure
    from model_runtime.sandbox.limits import Limits
    from ndif_operator.api import ModelAppArgs, ModelSpec, ModelUserConfig, RuntimeLimits
    from ndif_operator.evaluation import estimate
    from ndif_operator.evaluation.budget import CUDA_CONTEXT_BYTES

    root = Path(tempfile.mkdtemp(prefix="bench-budget-"))
    path = _build(shape, root)
    result_cap = 16 * 1024 * MIB  # larger than every save here: the budget's saved term is the hidden states
    limits = RuntimeLimits(max_batch_size=shape.batch, max_sequence_length=shape.sequence,
                           max_result_bytes=result_cap)
    spec = ModelSpec.model_validate({"repoId": f"bench/{shape.name}", "dtype": shape.dtype,
                                     "source": {"localPath": {"path": str(path)}}})
    sized = estimate(spec, limits)
    budget = sized.total_bytes - sized.weights_bytes - CUDA_CONTEXT_BYTES

    args = ModelAppArgs.model_validate({"model_key": "bench", "deployment": "bench/budget", "repo_id": str(path),
                                        "source": {"local_path": {"path": str(path)}}, "dtype": shape.dtype})
    server = load_model(args).model
    attention = server._module.config._attn_implementation
    config = ModelUserConfig(max_batch_size=shape.batch, max_sequence_length=shape.sequence,
                             max_result_bytes=result_cap, request_timeout_seconds=3600)
    configure(Limits.from_config(config))
    runner = execution.select_runner()
    exec_limits = execution.ExecutionLimits(timeout_seconds=3600, max_result_bytes=result_cap)
    peaks: list[int] = []

    def measured(model: Any, blob: bytes, envelope: Any) -> dict[str, Any]:
        saves = runner(model, blob, envelope)
        peaks.append(_status("VmHWM"))  # after the trace, before serialising
        return saves

    def run(batch: int, sequence: int) -> float:
        request, blob = _payload(path, shape, batch, sequence)
        envelope = execution.Envelope(**request.model_dump())
        _trim()
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        before = _status("VmRSS")
        started = time.perf_counter()
        out = execution.execute_request(server, blob, envelope, limits=exec_limits, on_log=lambda _l: None,
                                        runner=measured)
        assert out.error is None, out.error
        peaks.append(peaks.pop() - before)
        return time.perf_counter() - started

    run(min(2, shape.batch), 16)  # warm-up: imports, the request thread, nnsight's caches
    seconds = run(shape.batch, shape.sequence)
    peak = peaks[-1]
    return {**asdict(shape), "attention": attention, "estimate_attention": sized.attention, "budget": budget,
            "peak": peak, "ratio": budget / peak, "seconds": seconds,
            "ranks": {r.tensor_parallel_size: r.bytes for r in sized.ranks}}


def _child(name: str) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = f"{root}{os.pathsep}{env.get('PYTHONPATH', '')}"
    proc = subprocess.run([sys.executable, __file__, "--child", name], env=env, capture_output=True, text=True,
                          timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        shape = next(s for s in SHAPES if s.name == argv[1])
        print(json.dumps(measure(shape)), flush=True)
        return 0
    chosen = [s for s in SHAPES if not argv or s.name in argv]
    print(f"load average at start: {os.getloadavg()[0]:.1f}; {os.cpu_count()} CPUs", flush=True)
    print(f"{'shape':<24} {'attention':<9} {'budget MiB':>11} {'peak MiB':>9} {'budget/peak':>11} {'run s':>6}")
    ratios = []
    for shape in chosen:
        row = _child(shape.name)
        ratios.append(row["ratio"])
        print(f"{shape.name:<24} {row['attention']:<9} {row['budget'] / MIB:>11.1f} {row['peak'] / MIB:>9.1f}"
              f" {row['ratio']:>11.3f} {row['seconds']:>6.1f}", flush=True)
        if row["attention"] != row["estimate_attention"]:
            print(f"  MISMATCH: runtime runs {row['attention']}, the estimate assumed {row['estimate_attention']}")
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    within = all(1.0 <= r <= 1.25 for r in ratios)
    print(f"headline: budget/peak worst {min(ratios):.2f} (lowest), highest {max(ratios):.2f} over {len(ratios)}"
          f" shapes; every shape within [1.00, 1.25]: {'yes' if within else 'no'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

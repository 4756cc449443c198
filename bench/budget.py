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

Tensor-parallel shapes (TP=2) run both ranks as the replica's ranks run (`parallel.group`:
`join_group` over a loopback gloo group, `load_rank`, `execute_request` with the sandbox) in two
subprocesses, each measured the same way; their budget is one rank's
(`runtime_budget(..., ranks=2)`). Their payload saves the same embedding output, layers and logits.

budget = the estimate's total minus the weights and the CUDA context (absent on CPU). The target
is budget / peak within [1.0, 1.25] for every shape. The LAST line is the headline:
`headline: budget/peak worst X.XX (lowest), highest Y.YY over N shapes; every shape within [1.00, 1.25]: yes`
(the lowest ratio is the worst: below 1.0 the budget under-covers).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
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
# Tensor-parallel shapes: two ranks (gloo, loopback), each measured; the budget is one rank's.
TP_SHAPES = (
    Shape("tp2-b2-s2048-v32k", 2, 2048, 32000),
    Shape("tp2-b1-s2048-v128k", 1, 2048, 128256),
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
    inputs = {"input_ids": ids, "attention_mask": mask}
    with client.trace(inputs, backend=backend):
        embedded = embed.output.save()  # noqa: F841 - only the payload matters
        hidden = [layer.output.save() for layer in layers]  # noqa: F841
        logits = client.lm_head.output.save()  # noqa: F841
    return captured[0]


RESULT_CAP = 16 * 1024 * MIB  # larger than every save here: the budget's saved term is the hidden states


def _limits(shape: Shape) -> Any:
    from ndif_operator.api import RuntimeLimits

    return RuntimeLimits(max_batch_size=shape.batch, max_sequence_length=shape.sequence, max_result_bytes=RESULT_CAP)


def _spec(shape: Shape, path: Path) -> Any:
    from ndif_operator.api import ModelSpec

    return ModelSpec.model_validate({"repoId": f"bench/{shape.name}", "dtype": shape.dtype,
                                     "source": {"localPath": {"path": str(path)}}})


def _request_peak(model: Any, path: Path, shape: Shape) -> tuple[int, float]:
    """(peak bytes, seconds) of one full-batch request through the replica's seam, after a warm-up:
    the sandbox configured with the shape's limits, as the replica configures it."""
    from model_runtime.replica import execution
    from model_runtime.sandbox.executor import configure
    from model_runtime.sandbox.limits import Limits
    from ndif_operator.api import ModelUserConfig

    configure(Limits.from_config(ModelUserConfig(max_batch_size=shape.batch, max_sequence_length=shape.sequence,
                                                 max_result_bytes=RESULT_CAP, request_timeout_seconds=3600)))
    runner = execution.select_runner()
    exec_limits = execution.ExecutionLimits(timeout_seconds=3600, max_result_bytes=RESULT_CAP)
    peaks: list[int] = []

    def measured(model: Any, blob: bytes, envelope: Any) -> dict[str, Any]:
        saves = runner.run(model, blob, envelope)
        peaks.append(_status("VmHWM"))  # after the trace, before serialising
        return saves

    def run(batch: int, sequence: int) -> float:
        request, blob = _payload(path, shape, batch, sequence)
        envelope = execution.Envelope(**request.model_dump())
        _trim()
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        before = _status("VmRSS")
        started = time.perf_counter()
        out = execution.execute_request(model, blob, envelope, limits=exec_limits, on_log=lambda _l: None,
                                        runner=replace(runner, run=measured))
        assert out.error is None, out.error
        peaks.append(peaks.pop() - before)
        return time.perf_counter() - started

    run(min(2, shape.batch), 16)  # warm-up: imports, the request thread, nnsight's caches
    seconds = run(shape.batch, shape.sequence)
    return peaks[-1], seconds


def measure(shape: Shape) -> dict[str, Any]:
    """Run in the subprocess: budget and measured peak for `shape`."""
    import torch

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-budget-"))
    try:
        return _measure_in(shape, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # a model of up to ~1 GB per shape


def _measure_in(shape: Shape, root: Path) -> dict[str, Any]:
    from model_runtime.replica.loading import load_model
    from ndif_operator.api import ModelAppArgs
    from ndif_operator.evaluation import estimate
    from ndif_operator.evaluation.budget import CUDA_CONTEXT_BYTES

    path = _build(shape, root)
    sized = estimate(_spec(shape, path), _limits(shape))
    budget = sized.total_bytes - sized.weights_bytes - CUDA_CONTEXT_BYTES
    args = ModelAppArgs.model_validate({"model_key": "bench", "deployment": "bench/budget", "repo_id": str(path),
                                        "source": {"local_path": {"path": str(path)}}, "dtype": shape.dtype})
    server = load_model(args).model
    attention = server._module.config._attn_implementation
    peak, seconds = _request_peak(server, path, shape)
    return {**asdict(shape), "attention": attention, "estimate_attention": sized.attention, "budget": budget,
            "peak": peak, "ratio": budget / peak, "seconds": seconds,
            "ranks": {r.tensor_parallel_size: r.bytes for r in sized.ranks}}


def measure_tp(shape: Shape, rank: int, port: int, root: Path) -> dict[str, Any]:
    """Run in each rank's subprocess: one rank of a TP=2 replica, joined, loaded and run as the
    replica's ranks are (`parallel.group.open_store` / `join_group`, `parallel.shard_rank.load_rank`,
    `execute_request`); its own peak."""
    import torch

    torch.set_num_threads(1)
    from model_runtime.replica.parallel.group import join_group, open_store
    from model_runtime.replica.parallel.shard_rank import load_rank
    from ndif_operator.api import ModelAppArgs
    from ndif_operator.evaluation import estimate
    from ndif_operator.evaluation.budget import CUDA_CONTEXT_BYTES, runtime_budget
    from ndif_operator.evaluation.cache import EstimateCache

    path = root / shape.name
    store = None
    if rank == 0:
        store = open_store(2)
        print(f"PORT {store.port}", flush=True)
        port = store.port
    join_group(rank, 2, port, "cpu", store=store)
    args = ModelAppArgs.model_validate({"model_key": "bench", "deployment": "bench/budget", "repo_id": str(path),
                                        "source": {"local_path": {"path": str(path)}}, "dtype": shape.dtype,
                                        "tensor_parallel_size": 2})
    held = load_rank(args, str(path), "cpu")
    cache = EstimateCache()
    estimate(_spec(shape, path), _limits(shape), cache)
    entry = cache.get_for(_spec(shape, path))
    assert entry is not None and entry.shape is not None
    budget = runtime_budget(entry.shape, _limits(shape), entry.element_size, ranks=2).total - CUDA_CONTEXT_BYTES
    even = (runtime_budget(entry.shape, _limits(shape), entry.element_size).total - CUDA_CONTEXT_BYTES) // 2
    peak, _seconds = _request_peak(held.model, path, shape)
    return {**asdict(shape), "rank": rank, "budget": budget, "peak": peak, "ratio": budget / peak,
            "even_split_budget": even}


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "GLOO_SOCKET_IFNAME": "lo"}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = f"{root}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def _tp_children(name: str) -> list[dict[str, Any]]:
    """Both ranks of a TP=2 shape: rank 0 opens the store and prints its port, rank 1 joins."""
    shape = next(s for s in TP_SHAPES if s.name == name)
    root = Path(tempfile.mkdtemp(prefix="bench-budget-tp-"))
    _build(shape, root)
    cmd = [sys.executable, __file__, "--tp-rank", name, str(root)]
    first = subprocess.Popen([*cmd, "0", "0"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert first.stdout is not None
    port = next((line.split()[1] for line in first.stdout if line.startswith("PORT ")), "")
    second = subprocess.Popen([*cmd, "1", port], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    rows = []
    try:
        for proc in (first, second):
            out, err = proc.communicate(timeout=3600)
            lines = [line for line in out.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"{name} failed (rc {proc.returncode}):\n{err[-3000:]}")
            rows.append(json.loads(lines[-1]))
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
        shutil.rmtree(root, ignore_errors=True)
    return rows


def _child(name: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", name], env=_env(), capture_output=True, text=True,
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
    if argv[:1] == ["--tp-rank"]:
        shape = next(s for s in TP_SHAPES if s.name == argv[1])
        print(json.dumps(measure_tp(shape, int(argv[3]), int(argv[4]), Path(argv[2]))), flush=True)
        return 0
    chosen = [s for s in SHAPES if not argv or s.name in argv]
    chosen_tp = [s for s in TP_SHAPES if not argv or s.name in argv]
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
    for shape in chosen_tp:
        for row in _tp_children(shape.name):
            ratios.append(row["ratio"])
            print(f"{shape.name + ' rank ' + str(row['rank']):<24} {'sdpa':<9} {row['budget'] / MIB:>11.1f}"
                  f" {row['peak'] / MIB:>9.1f} {row['ratio']:>11.3f}   (TP=1 budget / 2:"
                  f" {row['even_split_budget'] / row['peak']:.3f})", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    within = all(1.0 <= r <= 1.25 for r in ratios)
    print(f"headline: budget/peak worst {min(ratios):.2f} (lowest), highest {max(ratios):.2f} over {len(ratios)}"
          f" shapes; every shape within [1.00, 1.25]: {'yes' if within else 'no'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

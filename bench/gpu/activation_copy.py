"""On a real GPU: the host → device copy rate against the runtime's WARM → HOT activation path.

For the device tool (one NVIDIA GPU, no network). Three copy rates of the same bytes, then the
runtime's own path through real Ray:

1. pinned host memory → GPU (`pin_memory=True`, `non_blocking` + sync): the hardware's rate;
2. pageable host memory → GPU (plain tensors): what a copy from ordinary RAM gets;
3. the node's weight store → GPU: a model filled into the store (`host_copy.obtain` in the driver),
   then, in a fresh Ray actor with the GPU (as a replacement replica would be), `obtain()` maps it
   (skeleton + zero-copy views of the object store) and `to_device("cuda")` copies it; timed apart.
   A COLD load (checkpoint → CPU → GPU, store off) in another fresh actor is the baseline.

    python bench/gpu/activation_copy.py [--layers 16] [--dtype bfloat16]

Last line: `gpu activation: store→GPU X GB/s (pinned Y, pageable Z GB/s); warm A s vs cold B s (R.Rx)`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def copy_rates(total_bytes: int, chunk_bytes: int = 64 * 1024**2) -> tuple[float, float]:
    """GB/s of pinned and pageable host → device copies of `total_bytes` in weight-sized tensors."""
    import torch

    count = max(1, total_bytes // chunk_bytes)
    results = []
    for pinned in (True, False):
        host = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=pinned) for _ in range(count)]
        for t in host:
            t.fill_(1)
        best = float("inf")
        for _ in range(3):
            torch.cuda.synchronize()
            started = time.perf_counter()
            device = [t.to("cuda", non_blocking=pinned) for t in host]
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - started)
            del device
            torch.cuda.empty_cache()
        results.append(rate(count * chunk_bytes, best))
        del host
    return results[0], results[1]


def activation_in_fresh_actor(args_json: dict[str, Any], use_store: bool) -> dict[str, float]:
    import ray

    @ray.remote(num_gpus=1, num_cpus=1, max_calls=1)  # a fresh process per call, like a new replica
    def activate(raw: dict[str, Any], store: bool) -> dict[str, float]:
        import os as actor_os

        actor_os.environ["NDIF_WEIGHT_STORE"] = "1" if store else "0"
        import torch

        from model_runtime.replica import host_copy
        from model_runtime.replica.loading import load_model
        from ndif_operator.api import ModelAppArgs

        started = time.perf_counter()
        args = ModelAppArgs.model_validate(raw)
        copy = host_copy.obtain(args, lambda: load_model(args.model_copy(update={"gpus_per_replica": 0.0})))
        mapped = time.perf_counter()
        torch.cuda.synchronize()
        copy.to_device("cuda")
        torch.cuda.synchronize()
        done = time.perf_counter()
        param = next(copy.model._module.parameters())
        return {"obtain": mapped - started, "copy": done - mapped, "total": done - started,
                "source": copy.source_kind, "device": str(param.device), "nbytes": float(copy.nbytes)}

    return dict(ray.get(activate.remote(args_json, use_store)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16, help="decoder layers (16 at hidden 2048: ~1.8 GB bf16)")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)

    import ray
    import torch

    from model_runtime.replica import host_copy
    from model_runtime.replica.loading import load_model
    from model_runtime.tiny_models import build_tiny_model
    from ndif_operator.api import ModelAppArgs

    if not torch.cuda.is_available():
        print("no CUDA device: this script needs a GPU (the device tool's machine)")
        return 2
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="ndif-gpu-"))
    started = time.perf_counter()
    model_dir = build_tiny_model("llama", workdir / "model", dtype=args.dtype, config_overrides={
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": args.layers,
        "num_attention_heads": 16, "num_key_value_heads": 4})
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    print(f"model: {weights / 1e9:.2f} GB of {args.dtype} weights, built in {time.perf_counter() - started:.1f} s",
          flush=True)

    pinned, pageable = copy_rates(weights)
    print(f"host → device: pinned {pinned:.1f} GB/s, pageable {pageable:.1f} GB/s "
          f"({weights / pinned / 1e9:.2f} s / {weights / pageable / 1e9:.2f} s for the weights)", flush=True)

    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, object_store_memory=int(weights * 1.5) + 2**30,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "4"}})
    try:
        raw = {"model_key": "gpu-bench/model", "deployment": "bench/gpu", "repo_id": str(model_dir),
               "source": {"local_path": {"path": str(model_dir)}}, "dtype": args.dtype, "gpus_per_replica": 1.0}
        model_args = ModelAppArgs.model_validate(raw)
        started = time.perf_counter()
        filled = host_copy.obtain(model_args, lambda: load_model(model_args.model_copy(
            update={"gpus_per_replica": 0.0})))
        print(f"store fill (read checkpoint, publish): {time.perf_counter() - started:.2f} s, "
              f"source {filled.source_kind}", flush=True)
        del filled
        warm = [activation_in_fresh_actor(raw, True) for _ in range(2)]
        cold = activation_in_fresh_actor(raw, False)
    finally:
        ray.shutdown()
    best = min(warm, key=lambda r: r["total"])
    store_rate = rate(weights, best["copy"])
    for name, row in (("warm (store → GPU)", best), ("cold (disk → CPU → GPU)", cold)):
        print(f"{name}: obtain {row['obtain']:.2f} s, copy {row['copy']:.2f} s, total {row['total']:.2f} s, "
              f"source {row['source']}, on {row['device']}")
    print(f"gpu activation: store→GPU {store_rate:.1f} GB/s (pinned {pinned:.1f}, pageable {pageable:.1f} GB/s); "
          f"warm {best['total']:.2f} s vs cold {cold['total']:.2f} s ({cold['total'] / best['total']:.1f}x); "
          f"warm copy {best['copy'] / (weights / pinned / 1e9):.1f}x the pinned copy time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

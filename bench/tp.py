"""Tensor-parallel benchmark: TP=2 against TP=1 of the same checkpoint, in the same run, on CPU/gloo.

The path users take: a local Ray Serve with the gateway and two model apps of one checkpoint (a
copy in a second directory, so the gateway routes them apart), TP=1 and TP=2 (a STRICT_PACK
placement group of two `{CPU: 0.01}` bundles, as the renderer emits for a CPU-only cluster), and
the unmodified nnsight client. Measured, interleaved TP=1 / TP=2:

1. request latency (client round trip of a trace saving the logits), median of --requests;
2. load time (the replica's first load, all ranks, from `info()["transitions"]`);
3. bytes read per rank from the checkpoint (instrumented) against the checkpoint's tensor bytes;
4. WARM → HOT activation time (`set_level`), median of --rounds.

    python bench/tp.py [--requests 30] [--rounds 3] [--hidden 256] [--layers 4]

The last line is the headline.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for key, value in {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(key, value)

PROMPT = "The Eiffel Tower is in the city of"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def build_checkpoint(out: Path, hidden: int, layers: int) -> Path:
    """A random-weight Llama a bit larger than the test models (so compute is not all overhead)."""
    import torch
    from transformers import AutoModelForCausalLM

    from model_runtime.tiny_models import build_config, build_tokenizer

    tokenizer = build_tokenizer()
    config = build_config("llama", len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                          num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def deploy(paths: dict[int, Path], port: int) -> None:
    from ray import serve
    from ray.serve.api import RunTarget

    from model_runtime.gateway import app as gateway_app
    from model_runtime.replica import app as model_app

    routes = {}
    targets = []
    for tp, path in paths.items():
        app = f"md-bench-tp{tp}"
        args = {"model_key": str(path).lower(), "deployment": f"bench/tp{tp}", "repo_id": str(path),
                "source": {"local_path": {"path": str(path)}}, "dtype": "float32", "tensor_parallel_size": tp}
        options: dict[str, Any] = {"ray_actor_options": {"num_cpus": 0}}
        if tp > 1:
            options.update(placement_group_bundles=[{"CPU": 0.01}] * tp, placement_group_strategy="STRICT_PACK")
        targets.append(RunTarget(target=model_app.ModelReplica.options(**options).bind(args), name=app,
                                 route_prefix=None))
        routes[str(path).lower()] = {"deployment": f"bench/tp{tp}", "level": "Hot", "app": app,
                                     "repo_id": str(path)}
    gateway = gateway_app.NnsightGateway.options(ray_actor_options={"num_cpus": 0}, user_config={"models": routes})
    targets.append(RunTarget(target=gateway.bind({}), name="gateway", route_prefix="/"))
    serve.run_many(targets)


def client(path: Path, url: str) -> Any:
    import nnsight
    from nnsight import TransformersModel
    from nnsight.modeling.huggingface import _ID_CACHE

    _ID_CACHE[str(path)] = str(path)
    nnsight.CONFIG.API.HOST = url
    nnsight.CONFIG.APP.REMOTE_LOGGING = False
    return TransformersModel(str(path), task="text-generation")


def trace_seconds(model: Any) -> float:
    started = time.perf_counter()
    with model.trace(PROMPT, remote=True):
        model.lm_head.output.save()
    return time.perf_counter() - started


def checkpoint_tensor_bytes(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)
            total += tensor.numel() * tensor.element_size()
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    workdir = Path(tempfile.mkdtemp(prefix="ndif-bench-tp-"))
    one = build_checkpoint(workdir / "tp1", args.hidden, args.layers)
    two = Path(shutil.copytree(one, workdir / "tp2"))  # same bytes, a second key for the gateway
    paths = {1: one, 2: two}
    checkpoint = checkpoint_tensor_bytes(one)
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE",
                                                                  "TRANSFORMERS_OFFLINE")}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(paths, port)
        url = f"http://127.0.0.1:{port}"
        models = {tp: client(path, url) for tp, path in paths.items()}
        handles = {tp: serve.get_app_handle(f"md-bench-tp{tp}") for tp in paths}
        for tp in paths:  # warm up both (first request pays imports and caches)
            for _ in range(3):
                trace_seconds(models[tp])
        latency: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(args.requests):  # interleaved
            for tp in paths:
                latency[tp].append(trace_seconds(models[tp]))
        infos = {tp: handles[tp].info.remote().result() for tp in paths}
        activation: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(args.rounds):
            for tp in paths:
                handles[tp].set_level.remote("Warm").result()
                activation[tp].append(float(handles[tp].set_level.remote("Hot").result()["seconds"]))
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(workdir, ignore_errors=True)

    # Replica start → loaded: for TP=2 that includes starting the shard actor and both ranks' loads.
    load = {tp: float(infos[tp]["startup"]["loaded"] - infos[tp]["startup"]["init_started"]) for tp in paths}
    per_rank = infos[2]["bytes_read_by_rank"]
    med = {tp: statistics.median(v) for tp, v in latency.items()}
    act = {tp: statistics.median(v) for tp, v in activation.items()}
    print(f"machine load average during the run: {os.getloadavg()[0]:.1f} (1 min)")
    print(f"checkpoint: llama hidden {args.hidden}, {args.layers} layers, {checkpoint} tensor bytes (float32)")
    print(f"request latency (median of {args.requests}, interleaved): TP=1 {med[1] * 1000:.1f} ms, "
          f"TP=2 {med[2] * 1000:.1f} ms -> {med[2] / med[1]:.2f}x")
    print(f"load time (all ranks): TP=1 {load[1]:.2f} s, TP=2 {load[2]:.2f} s -> {load[2] / load[1]:.2f}x")
    print(f"load time counts replica start to loaded (TP=1 load source: {infos[1]['source']})")
    print("bytes read per rank at TP=2: " + ", ".join(f"rank {r}: {b}" for r, b in sorted(per_rank.items()))
          + f"; TP=1 read {infos[1].get('bytes_read_by_rank') or 'n/a (single-device loader, not counted)'}")
    print(f"WARM->HOT activation (median of {args.rounds}): TP=1 {act[1] * 1000:.1f} ms, TP=2 {act[2] * 1000:.1f} ms"
          f" -> {act[2] / max(act[1], 1e-9):.2f}x")
    ratio = max(per_rank.values()) / checkpoint if checkpoint else float("nan")
    print(f"headline: per-rank bytes read / checkpoint bytes = {ratio:.2f} at TP=2; "
          f"latency TP=2/TP=1 = {med[2] / med[1]:.2f}x; load time TP=2/TP=1 = {load[2] / load[1]:.2f}x; "
          f"WARM->HOT TP=2/TP=1 = {act[2] / max(act[1], 1e-9):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

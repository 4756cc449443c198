"""GPU check for the tensor-parallel runtime, for the device tool (one script, no network).

On one GPU (what the device tool lends):
1. the single-device CUDA path: a tiny Llama loaded by the runtime's loader onto CUDA, an nnsight
   trace, logits compared with the CPU run (max abs diff);
2. the memory cap a rank applies (`levels.limit_gpu_share`): in a child process capped to 25% of
   the GPU, allocating 20% succeeds and allocating 40% raises CUDA OOM;
3. the runtime's rank code on CUDA with one rank (`join_group` with NCCL, `load_rank`), so the
   NCCL process group, the cap before the first allocation and the shard loader run on a GPU.
With >= 2 GPUs it also runs TP=2 over NCCL (two processes, one GPU each, `load_rank` as the
replica's ranks do) and compares logits, every layer's hidden states and generated tokens with
TP=1. NCCL refuses two ranks on one GPU, so a 1-GPU machine prints what it skipped.

    python bench/gpu/tp_cuda.py            # ~1-2 min on an H100, most of it imports

Last line: `headline: ...`.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PROMPT = "The Eiffel Tower is in the city of"


def _args(path: Path, tp: int, gpus: float, fraction: float = 0.0) -> Any:
    from ndif_operator.api import ModelAppArgs

    return ModelAppArgs(model_key=str(path).lower(), deployment="bench/gpu", repo_id=str(path),
                        source={"local_path": {"path": str(path)}}, dtype="float32", tensor_parallel_size=tp,
                        gpus_per_replica=gpus, gpu_fraction=fraction)


def _trace(model: Any) -> dict[str, Any]:
    import torch

    with torch.no_grad(), model.trace(PROMPT):
        h0 = model.model.layers[0].output.save()
        h1 = model.model.layers[1].output.save()
        logits = model.lm_head.output.save()
    with model.generate(PROMPT, max_new_tokens=6, do_sample=False) as tracer:
        tokens = tracer.result.save()
    return {"h0": h0.cpu(), "h1": h1.cpu(), "logits": logits.cpu(), "tokens": tokens.cpu()}


def _diff(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, bool]:
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in ("h0", "h1", "logits"))
    return worst, bool((a["tokens"] == b["tokens"]).all())


def single_gpu(path: Path) -> float:
    from model_runtime.replica.loading import load_model

    cpu = _trace(load_model(_args(path, 1, 0.0)).model)
    cuda_model = load_model(_args(path, 1, 1.0)).model
    assert next(cuda_model._module.parameters()).is_cuda
    worst, same = _diff(cpu, _trace(cuda_model))
    print(f"1. single-device CUDA path: max |cuda - cpu| = {worst:.2e}, tokens identical: {same}")
    return worst


def _cap_child(fraction: float, alloc_fraction: float) -> None:
    import torch

    from model_runtime.replica import levels

    levels.limit_gpu_share(fraction)
    total = torch.cuda.get_device_properties(0).total_memory
    try:
        torch.empty(int(total * alloc_fraction), dtype=torch.uint8, device="cuda")
        print("ALLOCATED")
    except torch.OutOfMemoryError:
        print("OOM")


def memory_cap() -> bool:
    import subprocess

    code = "import sys; sys.path.insert(0, %r); from bench.gpu.tp_cuda import _cap_child; _cap_child(0.25, %s)"
    small = subprocess.run([sys.executable, "-c", code % (str(ROOT), "0.20")], capture_output=True, text=True)
    big = subprocess.run([sys.executable, "-c", code % (str(ROOT), "0.40")], capture_output=True, text=True)
    ok = "ALLOCATED" in small.stdout and "OOM" in big.stdout
    print(f"2. memory cap 25%: 20% allocation -> {small.stdout.strip() or small.stderr[-200:]}, "
          f"40% allocation -> {big.stdout.strip() or big.stderr[-200:]} ({'ok' if ok else 'NOT ENFORCED'})")
    return ok


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(rank: int, world: int, port: int, path: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from model_runtime.replica.parallel.group import join_group
    from model_runtime.replica.parallel.shard_rank import load_rank

    os.environ["CUDA_VISIBLE_DEVICES"] = str(rank)  # as Ray does for each rank's actor
    store = dist.TCPStore("127.0.0.1", port, world, is_master=(rank == 0)) if rank == 0 else None
    join_group(rank, world, port, "cuda", store=store)
    held = load_rank(_args(Path(path), world, float(world), 0.9), path, "cuda")
    held.model._module.to("cuda")
    result = _trace(held.model)
    torch.save({**result, "bytes_read": held.shard.bytes_read}, f"{out}.{rank}")
    dist.destroy_process_group()


def ranks_on_cuda(path: Path, world: int) -> dict[str, Any]:
    import torch.multiprocessing as mp

    out = str(path.parent / f"rank-out-{world}")
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, str(path), out)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
        assert p.exitcode == 0, f"rank exited with {p.exitcode}"
    import torch

    return torch.load(f"{out}.0")


def main() -> int:
    import torch

    from model_runtime.tiny_models import build_tiny_model

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here")
        return 2
    gpus = torch.cuda.device_count()
    print(f"device: {torch.cuda.get_device_name(0)} x {gpus}, torch {torch.__version__}")
    path = build_tiny_model("llama", Path(tempfile.mkdtemp(prefix="ndif-gpu-tp-")) / "tiny-llama")
    started = time.monotonic()
    worst = single_gpu(path)
    cap_ok = memory_cap()
    one = ranks_on_cuda(path, 1)
    print(f"3. runtime rank code on CUDA (NCCL, 1 rank): bytes read {one['bytes_read']}")
    tp_line = "TP=2 over NCCL skipped (needs 2 GPUs; NCCL refuses two ranks on one GPU)"
    if gpus >= 2:
        two = ranks_on_cuda(path, 2)
        tp_worst, same = _diff(one, two)
        tp_line = (f"TP=2 over NCCL vs TP=1: max diff {tp_worst:.2e}, tokens identical {same}, "
                   f"rank 0 read {two['bytes_read']} of {one['bytes_read']} bytes")
    print(f"4. {tp_line}")
    print(f"headline: single-GPU CUDA vs CPU max diff = {worst:.1e}; memory cap enforced = {cap_ok}; "
          f"{tp_line}; {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

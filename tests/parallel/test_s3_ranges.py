"""Each tensor-parallel rank reads only its slices of an S3 checkpoint, by ranged GETs.

Against a real S3 API (the suite's moto server on loopback): two ranks over gloo load the same
tiny checkpoint first from S3, then from a local directory (the same two rank processes: the S3
load is each process's first); each rank holds the same tensors either way, and the bytes it
fetched from S3 (headers included) stay within (1/k of the sharded tensors + the replicated ones)
x 1.05.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from loopback import free_port

from model_runtime.replica.parallel.s3_slices import element_runs, region
from model_runtime.tiny_models import build_tiny_model
from parallel.checkpoint_split import checkpoint_split

WORLD = 2


def test_region_and_runs_of_a_column_split() -> None:
    shape = [4, 6]
    bounds, kept = region((slice(None), slice(3, 6)), shape)
    assert bounds == [(0, 4), (3, 6)] and kept == [0, 1]
    assert element_runs(bounds, shape) == [(3, 6), (9, 12), (15, 18), (21, 24)]  # one run per row


def test_region_and_runs_of_a_row_split_merge_into_one() -> None:
    shape = [4, 6]
    bounds, _ = region(slice(2, 4), shape)
    assert element_runs(bounds, shape) == [(12, 24)]
    bounds, kept = region((..., 1), [2, 3, 4])
    assert kept == [0, 1] and len(element_runs(bounds, [2, 3, 4])) == 6
    assert element_runs(*region(..., [5])[:1], [5]) == [(0, 5)]


def _rank_main(rank: int, port: int, checkpoints: dict[str, str], out: str) -> None:
    import torch.distributed as dist

    from model_runtime.replica.parallel.group import join_group
    from model_runtime.replica.parallel.shard_loading import load_shard

    torch.set_num_threads(1)
    # The suite's S3 server takes any key; earlier tests in the session may have scrubbed the
    # parent's environment (model_runtime/credentials.py), so each rank is given them here.
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(name, value)
    os.environ["NDIF_TP_MASTER_ADDR"] = "127.0.0.1"
    store = None
    if rank == 0:
        store = dist.TCPStore("127.0.0.1", port, WORLD, is_master=True, wait_for_workers=False)
    join_group(rank, WORLD, port, "cpu", store=store)
    loaded = {}
    for label, checkpoint in checkpoints.items():  # in order: the first load is the process's first
        shard = load_shard(checkpoint, tensor_parallel_size=WORLD, dtype=torch.float32, device="cpu")
        state = {n: getattr(t, "_local_tensor", t).detach().clone() for n, t in shard.module.state_dict().items()}
        loaded[label] = {"bytes": shard.bytes_read, "state": state}
    torch.save(loaded, f"{out}.{rank}")
    dist.destroy_process_group()


def _load_on_two_ranks(checkpoints: dict[str, str], out: Path) -> list[dict[str, Any]]:
    """Each rank process loads `checkpoints` in order; per rank, {label: {"bytes", "state"}}."""
    context = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [context.Process(target=_rank_main, args=(rank, port, checkpoints, str(out))) for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(300)
        assert proc.exitcode == 0, f"rank process ended with {proc.exitcode}"
    return [torch.load(f"{out}.{rank}") for rank in range(WORLD)]


@pytest.mark.slow
def test_each_rank_reads_its_slices_from_s3(s3_endpoint: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    from model_runtime.replica.parallel.s3_slices import stage_s3_index

    monkeypatch.setenv("NDIF_MODEL_CACHE_DIR", str(tmp_path / "cache"))
    path = build_tiny_model("llama", tmp_path / "tiny-llama")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="tp-ranges")
    for file in path.iterdir():
        s3.upload_file(str(file), "tp-ranges", f"ckpt/{file.name}")
    index = stage_s3_index("tp-ranges", "ckpt", endpoint_url=s3_endpoint, region=None)
    assert (index / "model.safetensors").stat().st_size == 0  # nothing of the weights staged

    ranks = _load_on_two_ranks({"s3": str(index), "local": str(path)}, tmp_path / "loaded")
    sharded, replicated = checkpoint_split(path)
    assert sharded > replicated
    for rank, loaded in enumerate(ranks):
        remote, local = loaded["s3"], loaded["local"]
        assert remote["state"].keys() == local["state"].keys()
        for name, tensor in local["state"].items():
            assert torch.equal(remote["state"][name], tensor), (rank, name)
        fetched = remote["bytes"]
        assert sharded / WORLD <= fetched <= (sharded / WORLD + replicated) * 1.05, (rank, fetched)

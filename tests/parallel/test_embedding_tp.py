"""A vocabulary-parallel embedding reads and edits as on one device (two gloo ranks, the replica's path).

transformers shards a Llama's `embed_tokens` by vocabulary rows on TP. Real client payloads that save
its input and output, edit its output in place, replace it, and edit it at every step of a
`generate`, run on both ranks exactly as the
replica's ranks run them (`parallel.shard_rank.load_rank`, `run_on_rank`: sandbox included) and on the
same checkpoint loaded on one device (`replica.loading.load_model`), and give the same results.
"""

from __future__ import annotations

import io
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from loopback import free_port
from nnsight.schema.request import RequestModel
from nnsight.tracing.backend import Backend

from model_runtime.tiny_models import build_tiny_model

WORLD = 2
PROMPTS = ["Madison Square Garden is located in", "The Eiffel Tower"]


def _args(checkpoint: str, tp: int) -> Any:
    from ndif_operator.api import ModelAppArgs

    return ModelAppArgs.model_validate({"model_key": "k", "deployment": "test/embedding", "repo_id": checkpoint,
                                        "source": {"local_path": {"path": checkpoint}}, "dtype": "float32",
                                        "tensor_parallel_size": tp})


def _rank_main(rank: int, port: int, checkpoint: str, blobs: dict[str, bytes], out: str) -> None:
    from model_runtime.replica.execution import ExecutionLimits
    from model_runtime.replica.parallel.group import join_group, tcp_store
    from model_runtime.replica.parallel.shard_rank import load_rank, run_on_rank

    torch.set_num_threads(1)
    os.environ["NDIF_TP_MASTER_ADDR"] = "127.0.0.1"
    limits = ExecutionLimits(timeout_seconds=120)
    envelope = {"model_key": "k", "compress": False}

    def run(model: Any) -> dict[str, Any]:
        found = {}
        for name, blob in blobs.items():
            result = run_on_rank(model, blob, envelope, limits)
            assert result.error is None, f"{name} on rank {rank}: {result.error}"
            assert result.result is not None
            found[name] = torch.load(io.BytesIO(result.result), weights_only=False)
        return found

    store = tcp_store("127.0.0.1", port, WORLD, is_master=True, wait_for_workers=False) if rank == 0 else None
    join_group(rank, WORLD, port, "cpu", store=store)
    results = {"tp2": run(load_rank(_args(checkpoint, WORLD), checkpoint, "cpu").model)}
    if rank == 0:  # the same checkpoint on one device, in the same process
        from model_runtime.replica.loading import load_model

        results["tp1"] = run(load_model(_args(checkpoint, 1)).model)
    torch.save(results, f"{out}.{rank}")


class _Capture(Backend):
    def __init__(self) -> None:
        self.blob = b""

    def __call__(self, tracer: Any) -> None:
        self.blob = RequestModel.serialize(tracer, compress=False)


def _payloads(checkpoint: Path) -> dict[str, bytes]:
    """Real client payloads (the unmodified nnsight client, model on meta)."""
    from nnsight import TransformersModel
    from nnsight.modeling.huggingface import _ID_CACHE

    _ID_CACHE[str(checkpoint)] = str(checkpoint)
    client = TransformersModel(str(checkpoint), task="text-generation")
    embed = client.model.embed_tokens
    blobs = {}
    with client.trace(PROMPTS, backend=(capture := _Capture())):
        ids = embed.input.save()  # noqa: F841 - saved by name
        embedded = embed.output.save()  # noqa: F841
        first = client.model.layers[0].input.save()  # noqa: F841
        logits = client.lm_head.output.save()
    blobs["read"] = capture.blob
    with client.trace(PROMPTS, backend=(capture := _Capture())):
        embed.output[:, 1] = 0.0  # an in-place edit of the gathered value
        logits = client.lm_head.output.save()
    blobs["edit"] = capture.blob
    with client.trace(PROMPTS, backend=(capture := _Capture())):
        embed.output = embed.output * 2 + 0.25  # a replacement (a steering-style shift)
        logits = client.lm_head.output.save()  # noqa: F841
    blobs["replace"] = capture.blob
    with client.generate(PROMPTS[0], max_new_tokens=3, do_sample=False, backend=(capture := _Capture())) as tracer:
        embedded_steps = list().save()
        logits_steps = list().save()
        for step in tracer.iter[0:3]:  # noqa: B007 - every step's lookup, edited, through generate
            embedded_steps.append(embed.output.clone())
            embed.output[:, -1] += 0.1
            logits_steps.append(client.lm_head.output)
    blobs["generate"] = capture.blob
    return blobs


@pytest.mark.slow
def test_embedding_input_output_and_edits_on_tp_equal_one_device(tmp_path: Path) -> None:
    checkpoint = build_tiny_model("llama", tmp_path / "llama")
    blobs = _payloads(checkpoint)
    context = multiprocessing.get_context("spawn")
    port = free_port()
    out = str(tmp_path / "r")
    procs = [context.Process(target=_rank_main, args=(rank, port, str(checkpoint), blobs, out))
             for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(300)
        assert proc.exitcode == 0, f"rank process ended with {proc.exitcode}"
    ranks = [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(WORLD)]
    single = ranks[0]["tp1"]
    vocab = single["read"]["logits"].shape[-1]
    ids = single["read"]["ids"]
    assert bool((ids < vocab // 2).any()) and bool((ids >= vocab // 2).any()), "both ranks' vocab halves looked up"
    assert not torch.equal(single["edit"]["logits"], single["read"]["logits"])  # the edits changed the model
    assert not torch.equal(single["replace"]["logits"], single["read"]["logits"])
    for rank, found in enumerate(ranks):
        for name, saves in single.items():
            assert saves.keys() == found["tp2"][name].keys()
            for key, expected in saves.items():
                got = found["tp2"][name][key]
                pairs = list(zip(got, expected, strict=True)) if isinstance(expected, list) else [(got, expected)]
                assert pairs, (rank, name, key)
                for tp2, tp1 in pairs:
                    assert type(tp2) is torch.Tensor and tp2.shape == tp1.shape, (rank, name, key)
                    assert torch.allclose(tp2, tp1, atol=1e-5), (rank, name, key, (tp2 - tp1).abs().max())
    assert len(single["generate"]["embedded_steps"]) == 3

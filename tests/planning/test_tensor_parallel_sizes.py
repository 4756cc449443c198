"""The one rule for tensor-parallel sizes (`ndif_operator.api.parallel`) and the planner using it."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from ndif_operator.api import Level, Reason
from ndif_operator.api.parallel import (
    PROJECT_TP_PLANS,
    ParallelDims,
    ParallelShape,
    allowed_tensor_parallel_sizes,
    has_tp_plan,
    tensor_parallel_problems,
)
from ndif_operator.cli import main
from ndif_operator.planning import Inventory, PlacementRequest, WorkerGroup, plan

GIB = 1024**3
NOW = datetime(2026, 1, 1, tzinfo=UTC)
LLAMA_70B = ParallelShape.of("llama", 64, 8, 28672)
ODD = ParallelShape.of("llama", 6, 2, 1536)  # 6 heads: 4 ranks cannot hold whole heads


def test_sizes_follow_heads_kv_heads_and_intermediate_size() -> None:
    assert LLAMA_70B.tensor_parallel_sizes == [1, 2, 4, 8]
    assert ODD.tensor_parallel_sizes == [1, 2]
    assert tensor_parallel_problems(ODD, 4) == ["attention heads 6 is not divisible by 4",
                                                "key/value heads 2 is not divisible by 4"]
    assert tensor_parallel_problems(ParallelShape.of("llama", 8, 8, 100), 8) == [
        "intermediate size (MLP width) 100 is not divisible by 8"]
    # An architecture with no TP plan anywhere (GPT-2's Conv1D) allows no split at all.
    assert allowed_tensor_parallel_sizes(ParallelShape.of("gpt2", 12, 12, 3072)) == (1,)
    assert "gpt_neox" in PROJECT_TP_PLANS and has_tp_plan("llama") and not has_tp_plan("gpt2")


def test_parallel_dims_refuses_impossible_layouts_by_name() -> None:
    assert ParallelDims(world_size=2, tp=2, shape=ODD).tp_enabled
    with pytest.raises(ValueError, match=r"attention heads 6 is not divisible by 4.*it allows 1, 2"):
        ParallelDims(world_size=4, tp=4, shape=ODD)
    with pytest.raises(ValueError, match="must equal world_size"):
        ParallelDims(world_size=4, tp=2, shape=LLAMA_70B)


def _inventory() -> Inventory:
    return Inventory((WorkerGroup("h100", pods=1, gpus_per_pod=8, gpu_memory_bytes=80 * GIB,
                                  cpu_memory_bytes=512 * GIB),))


def test_planner_rejects_an_impossible_size_with_the_reason() -> None:
    request = PlacementRequest(key="ml/odd", total_bytes=10 * GIB, weights_bytes=8 * GIB, tensor_parallel_size=4,
                               parallel=ODD)
    decision = plan(_inventory(), [request], now=NOW).decision("ml/odd")
    assert decision.level != Level.HOT and decision.replicas == 0
    assert decision.reason == Reason.INVALID_SPEC  # no cluster can fix it: the spec must change
    assert "attention heads 6 is not divisible by 4" in decision.message
    assert "it allows 1, 2" in decision.message


def test_auto_skips_sizes_the_model_cannot_split_into() -> None:
    # 200 GiB: 4 ranks would fit 80 GiB GPUs, but 6 heads do not split 4 ways and 8 is refused too.
    big_odd = PlacementRequest(key="ml/odd", total_bytes=200 * GIB, weights_bytes=190 * GIB,
                               tensor_parallel_size="auto", parallel=ODD)
    decision = plan(_inventory(), [big_odd], now=NOW).decision("ml/odd")
    assert decision.level != Level.HOT and "tensorParallelSize 2" in decision.message
    fine = PlacementRequest(key="ml/llama", total_bytes=200 * GIB, weights_bytes=190 * GIB,
                            tensor_parallel_size="auto", parallel=LLAMA_70B)
    placed = plan(_inventory(), [fine], now=NOW).decision("ml/llama")
    assert placed.level == Level.HOT and placed.tensor_parallel_size == 4


def test_ranks_are_sized_by_the_estimates_per_rank_figure() -> None:
    # 200 GiB in all, but what every rank replicates (logits, saved values, embeddings) makes a
    # rank of 4 need 70 GiB, not 50: the share follows the per-rank figure, and 2 ranks do not fit.
    ranks = ((1, 200 * GIB), (2, 110 * GIB), (4, 70 * GIB), (8, 45 * GIB))
    request = PlacementRequest(key="ml/llama", total_bytes=200 * GIB, weights_bytes=160 * GIB,
                               tensor_parallel_size="auto", parallel=LLAMA_70B, rank_bytes=ranks)
    placed = plan(_inventory(), [request], now=NOW).decision("ml/llama")
    assert placed.level == Level.HOT and placed.tensor_parallel_size == 4
    assert placed.gpu_fraction == pytest.approx(70 / 80, abs=1e-4)
    even = plan(_inventory(), [replace(request, rank_bytes=())], now=NOW).decision("ml/llama")
    assert even.gpu_fraction < placed.gpu_fraction  # an even split would under-reserve each rank
    tight = replace(request, rank_bytes=((1, 200 * GIB), (2, 110 * GIB), (4, 85 * GIB), (8, 45 * GIB)))
    assert plan(_inventory(), [tight], now=NOW).decision("ml/llama").tensor_parallel_size == 8


def _llama_checkpoint(path: Path, heads: int, kv_heads: int) -> Path:
    """A hand-written safetensors checkpoint (no torch) with a Llama config."""
    path.mkdir(parents=True)
    header = {"embed.weight": {"dtype": "F32", "shape": [300, 96], "data_offsets": [0, 115200]}}
    raw = json.dumps(header).encode()
    (path / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(115200))
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 96, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "intermediate_size": 192, "vocab_size": 300,
    }))
    return path


def test_plan_command_shows_allowed_sizes_and_refuses_an_invalid_one(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model_dir = _llama_checkpoint(tmp_path / "odd", heads=6, kv_heads=2)
    doc = {
        "apiVersion": "ndif.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "odd", "namespace": "t"},
        "spec": {"model": {"repoId": "tiny/odd", "source": {"localPath": {"path": str(model_dir)}}},
                 "tensorParallelSize": 4},
    }
    (tmp_path / "odd.yaml").write_text(yaml.safe_dump(doc))
    inventory = Path(__file__).resolve().parents[2] / "inventories" / "example.yaml"
    code = main(["plan", "-f", str(tmp_path / "odd.yaml"), "--inventory", str(inventory)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "attention heads 6 is not divisible by 4" in out  # the decision's message
    assert "t/odd: 1, 2   (llama: 6 heads, 2 kv heads, intermediate 192)" in out

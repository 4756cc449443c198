"""The runtime budget (`evaluation.budget`): pure arithmetic over a model's shape and request limits."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ndif_operator.api import ModelSpec, RuntimeLimits
from ndif_operator.api.attention import Attention
from ndif_operator.evaluation.budget import (
    CUDA_CONTEXT_BYTES,
    forward_budget,
    rank_bytes,
    replicated_weight_bytes,
    request_tokens,
    runtime_budget,
)
from ndif_operator.evaluation.catalog import catalog_entry
from ndif_operator.evaluation.estimator import estimate_from_entry
from ndif_operator.evaluation.shape import ModelShape

GIB = 1024**3
LLAMA_8B = ModelShape(num_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      intermediate_size=14336, vocab_size=128256, max_positions=131072)
LLAMA_70B = ModelShape(num_layers=80, hidden_size=8192, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                       intermediate_size=28672, vocab_size=128256, max_positions=131072)
BF16 = 2


def _limits(batch: int, sequence: int, result: int = GIB) -> RuntimeLimits:
    return RuntimeLimits(max_batch_size=batch, max_sequence_length=sequence, max_result_bytes=result)


def test_sdpa_has_no_score_matrix_so_a_single_prompt_grows_linearly_with_its_length() -> None:
    short, long = (runtime_budget(LLAMA_8B, _limits(1, s), BF16) for s in (4096, 32768))
    assert long.constants == 2 * 32768 * 128 * BF16  # RoPE only: no mask for one unpadded prompt
    # Every term is linear in S, apart from `saved`, which the result limit caps.
    assert long.total - long.saved - CUDA_CONTEXT_BYTES <= 8 * (short.total - CUDA_CONTEXT_BYTES)
    # Llama-3.1-8B at 32k tokens: ~14 GiB beyond its 15 GiB of weights (an S^2 term made it 225).
    assert 12 * GIB < long.total < 16 * GIB


def test_eager_adds_the_score_matrix_and_its_float32_softmax() -> None:
    eager = replace(LLAMA_8B, attention=Attention.EAGER.value)
    b, s = 2, 4096
    sdpa_budget = runtime_budget(LLAMA_8B, _limits(b, s), BF16)
    eager_budget = runtime_budget(eager, _limits(b, s), BF16)
    scores = b * 32 * s * s * (BF16 + 4 + BF16)  # scores, float32 softmax, its cast back to bf16
    # The scores come on top of attention's other temporaries (which the MLP's exceed here).
    assert sdpa_budget.layer < eager_budget.layer and eager_budget.layer - scores <= sdpa_budget.layer
    assert eager_budget.constants - sdpa_budget.constants == b * s * s * BF16 - b * s * s  # float mask, not bool
    eager32, sdpa32 = runtime_budget(eager, _limits(b, s), 4), runtime_budget(LLAMA_8B, _limits(b, s), 4)
    assert eager32.layer - b * 32 * s * s * (4 + 4) <= sdpa32.layer  # in float32 no cast back


def test_a_padded_batch_budgets_sdpas_boolean_mask() -> None:
    one, two = (runtime_budget(LLAMA_8B, _limits(b, 8192), BF16) for b in (1, 2))
    assert two.constants - 2 * one.constants == 2 * 8192 * 8192


def test_logits_are_the_models_dtype_and_bounded_by_batch_and_sequence() -> None:
    budget = runtime_budget(LLAMA_8B, _limits(2, 512), BF16)
    logits = 2 * 512 * 128256 * BF16
    assert budget.head == 2 * 512 * 4096 * (BF16 + 8) + logits
    assert budget.working == budget.head  # at a 128k vocabulary the head phase is the larger one


def test_saved_values_are_capped_by_the_result_limit() -> None:
    hidden_states = 33 * 8 * 2048 * 4096 * BF16  # every layer's output, 4.1 GiB
    assert runtime_budget(LLAMA_8B, _limits(8, 2048, 64 * GIB), BF16).saved == hidden_states
    assert runtime_budget(LLAMA_8B, _limits(8, 2048, GIB), BF16).saved == GIB


def test_the_sequence_is_capped_at_the_models_own_maximum() -> None:
    gpt2 = replace(LLAMA_8B, max_positions=1024)
    assert request_tokens(gpt2, _limits(4, 8192)) == (4, 1024)
    assert runtime_budget(gpt2, _limits(4, 8192), BF16) == runtime_budget(gpt2, _limits(4, 1024), BF16)


def test_tensor_parallel_ranks_divide_only_what_is_split() -> None:
    limits = _limits(8, 2048)
    one, four = runtime_budget(LLAMA_70B, limits, BF16), runtime_budget(LLAMA_70B, limits, BF16, ranks=4)
    assert four.kv_cache == one.kv_cache // 4  # kv heads are split
    assert four.saved == one.saved and four.context == one.context  # whole tensors on every rank
    # The lm_head is split and its output gathered: every rank holds its shard, nnsight's whole
    # copy for the trace and the all-gather's buffers and result.
    logits = 8 * 2048 * 128256 * BF16
    assert four.head == one.head + 2 * logits + logits // 4
    weights = 70_553_706_496 * BF16
    per_rank = rank_bytes(LLAMA_70B, limits, BF16, weights, 4)
    replicated = replicated_weight_bytes(LLAMA_70B, BF16)
    assert per_rank == -(-(weights - replicated) // 4) + replicated + four.total
    assert per_rank > (weights + one.total) / 4  # more than an even split of the replica's total


def test_llama_8b_fits_one_80g_gpu_at_its_own_128k_context() -> None:
    spec = ModelSpec.model_validate({"repoId": "meta-llama/Llama-3.1-8B", "dtype": "bfloat16"})
    entry = catalog_entry(spec)
    assert entry is not None
    sized = estimate_from_entry(entry, _limits(1, 131072))
    assert sized.attention == "sdpa" and sized.total_bytes < 75 * GIB
    assert [r.tensor_parallel_size for r in sized.ranks] == [1, 2, 4, 8]
    assert sized.ranks[0].bytes == sized.total_bytes


@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
def test_forward_budget_is_monotonic_in_batch_and_sequence(ranks: int) -> None:
    sizes = [(1, 512), (1, 4096), (4, 4096), (8, 8192)]
    totals = [forward_budget(LLAMA_70B, b, s, BF16, max_result_bytes=64 * GIB, ranks=ranks).total for b, s in sizes]
    assert totals == sorted(totals)

"""Attacks the dispatch-level guard stops: writes into served weights and buffers through paths a
Python-level name check does not see (class 3), and reads of uninitialised memory (class 4).

Class 3 programs each try to change the served model; they must be refused and leave the
weights bit-identical. Class 4 programs each allocate memory without initialising it and save
it; what comes back must hold nothing of an earlier request (`UNINITIALISED`).
"""
# ruff: noqa: F401 (the tables' programs use the imports as their globals)

import torch

from sandbox.attacks import PROMPT, in_trace, saved_in_trace

# --- class 3: weights and buffers changed ------------------------------------------------------


IN_TRACE = in_trace(globals(), {
    # A functional op that updates its running statistics in place; here they are a served weight.
    "batch_norm_running_stats_into_parameter": """
        w = model.model.norm.weight
        torch.nn.functional.batch_norm(torch.rand(4, 64), w, w, training=True, momentum=1.0)
    """,
    "batch_norm_running_stats_into_buffer": """
        inv_freq = model.model.rotary_emb.inv_freq
        torch.nn.functional.batch_norm(torch.rand(4, 8), inv_freq, inv_freq, None, None, True, 1.0)
    """,
    "instance_norm_running_stats": """
        w = model.model.norm.weight
        torch.nn.functional.instance_norm(torch.rand(1, 64, 3), w, w, use_input_stats=True, momentum=1.0)
    """,
    "relu_inplace_positional": "torch.nn.functional.relu(model.lm_head.weight, True)",
    "hardtanh_inplace_positional": """
        torch.nn.functional.hardtanh(model.model.layers[0].mlp.up_proj.weight, 0.0, 0.0, True)
    """,
    "dropout_inplace_positional": "torch.nn.functional.dropout(model.model.embed_tokens.weight, 0.9, True, True)",
    # The deprecated initialisers without the trailing underscore write in place all the same.
    "init_alias_normal": "torch.nn.init.normal(model.lm_head.weight)",
    "init_alias_constant": "torch.nn.init.constant(model.model.layers[1].self_attn.o_proj.weight, 0.0)",
    "init_alias_xavier": "torch.nn.init.xavier_uniform(model.model.layers[0].self_attn.q_proj.weight)",
    # max_norm renormalises the looked-up rows of the embedding matrix in place.
    "embedding_max_norm_renorm": """
        ids = torch.arange(10)
        torch.nn.functional.embedding(ids, model.model.embed_tokens.weight, max_norm=0.01)
    """,
    # The method taken off the class, not the object: no attribute lookup on the weight.
    "unbound_tensor_method": "torch.Tensor.mul_(model.lm_head.weight, 0)",
    # A metadata-only write: the served weight would stay transposed for every later user.
    "unbound_transpose_inplace": "torch.Tensor.t_(model.model.layers[0].mlp.gate_proj.weight)",
    "unbound_resize": "torch.Tensor.resize_(model.lm_head.weight, 1)",
    "unbound_copy_from_view": """
        row = model.lm_head.weight[3]
        torch.Tensor.copy_(row, torch.zeros(64))
    """,
    "index_put_through_class": "torch.Tensor.index_fill_(model.model.norm.weight, 0, torch.tensor([0, 1]), 0.0)",
})


WEIGHT_ATTACKS = IN_TRACE

# --- class 4: uninitialised memory -------------------------------------------------------------

UNINITIALISED = 300 * 64  # as many floats as a victim's hidden states / logits rows


UNINITIALISED_ATTACKS = saved_in_trace(globals(), {
    "tensor_constructor": "torch.Tensor(UNINITIALISED)",
    "unbound_new_empty": "torch.Tensor.new_empty(model.lm_head.output, (UNINITIALISED,))",
    "legacy_new": "torch.Tensor.new(model.lm_head.output, UNINITIALISED)",
    "resize_grows_into_freed_memory": "torch.Tensor.resize_(torch.zeros(1), UNINITIALISED)",
    "empty_strided": "torch.empty_strided((UNINITIALISED,), (1,))",
    "empty_permuted": "torch.empty_permuted((UNINITIALISED,), (0,))",
    "new_empty_strided": "torch.Tensor.new_empty_strided(torch.zeros(1), (UNINITIALISED,), (1,))",
    "empty_like_of_activation": "torch.empty_like(model.lm_head.output)",
})

"""Attacks the dispatch-level guard stops: writes into served weights and buffers through paths a
Python-level name check does not see (class 3), and reads of uninitialised memory (class 4).

Class 3 programs each try to change the served model; they must be refused and leave the
weights bit-identical. Class 4 programs each allocate memory without initialising it and save
it; what comes back must hold nothing of an earlier request (`UNINITIALISED`).
"""
# ruff: noqa: F841

import torch

from sandbox.attacks import PROMPT

# --- class 3: weights and buffers changed ------------------------------------------------------


def batch_norm_running_stats_into_parameter(model, backend):
    # A functional op that updates its running statistics in place; here they are a served weight.
    with model.trace(PROMPT, backend=backend):
        w = model.model.norm.weight
        torch.nn.functional.batch_norm(torch.rand(4, 64), w, w, training=True, momentum=1.0)
        out = model.lm_head.output.save()


def batch_norm_running_stats_into_buffer(model, backend):
    with model.trace(PROMPT, backend=backend):
        inv_freq = model.model.rotary_emb.inv_freq
        torch.nn.functional.batch_norm(torch.rand(4, 8), inv_freq, inv_freq, None, None, True, 1.0)
        out = model.lm_head.output.save()


def instance_norm_running_stats(model, backend):
    with model.trace(PROMPT, backend=backend):
        w = model.model.norm.weight
        torch.nn.functional.instance_norm(torch.rand(1, 64, 3), w, w, use_input_stats=True, momentum=1.0)
        out = model.lm_head.output.save()


def relu_inplace_positional(model, backend):
    with model.trace(PROMPT, backend=backend):
        torch.nn.functional.relu(model.lm_head.weight, True)
        out = model.lm_head.output.save()


def hardtanh_inplace_positional(model, backend):
    with model.trace(PROMPT, backend=backend):
        torch.nn.functional.hardtanh(model.model.layers[0].mlp.up_proj.weight, 0.0, 0.0, True)
        out = model.lm_head.output.save()


def dropout_inplace_positional(model, backend):
    with model.trace(PROMPT, backend=backend):
        torch.nn.functional.dropout(model.model.embed_tokens.weight, 0.9, True, True)
        out = model.lm_head.output.save()


def init_alias_normal(model, backend):
    # The deprecated initialisers without the trailing underscore write in place all the same.
    with model.trace(PROMPT, backend=backend):
        torch.nn.init.normal(model.lm_head.weight)
        out = model.lm_head.output.save()


def init_alias_constant(model, backend):
    with model.trace(PROMPT, backend=backend):
        torch.nn.init.constant(model.model.layers[1].self_attn.o_proj.weight, 0.0)
        out = model.lm_head.output.save()


def init_alias_xavier(model, backend):
    with model.trace(PROMPT, backend=backend):
        torch.nn.init.xavier_uniform(model.model.layers[0].self_attn.q_proj.weight)
        out = model.lm_head.output.save()


def embedding_max_norm_renorm(model, backend):
    # max_norm renormalises the looked-up rows of the embedding matrix in place.
    with model.trace(PROMPT, backend=backend):
        ids = torch.arange(10)
        torch.nn.functional.embedding(ids, model.model.embed_tokens.weight, max_norm=0.01)
        out = model.lm_head.output.save()


def unbound_tensor_method(model, backend):
    # The method taken off the class, not the object: no attribute lookup on the weight.
    with model.trace(PROMPT, backend=backend):
        torch.Tensor.mul_(model.lm_head.weight, 0)
        out = model.lm_head.output.save()


def unbound_transpose_inplace(model, backend):
    # A metadata-only write: the served weight would stay transposed for every later user.
    with model.trace(PROMPT, backend=backend):
        torch.Tensor.t_(model.model.layers[0].mlp.gate_proj.weight)
        out = model.lm_head.output.save()


def unbound_resize(model, backend):
    with model.trace(PROMPT, backend=backend):
        torch.Tensor.resize_(model.lm_head.weight, 1)
        out = model.lm_head.output.save()


def unbound_copy_from_view(model, backend):
    with model.trace(PROMPT, backend=backend):
        row = model.lm_head.weight[3]
        torch.Tensor.copy_(row, torch.zeros(64))
        out = model.lm_head.output.save()


def index_put_through_class(model, backend):
    with model.trace(PROMPT, backend=backend):
        torch.Tensor.index_fill_(model.model.norm.weight, 0, torch.tensor([0, 1]), 0.0)
        out = model.lm_head.output.save()


WEIGHT_ATTACKS = [
    batch_norm_running_stats_into_parameter, batch_norm_running_stats_into_buffer, instance_norm_running_stats,
    relu_inplace_positional, hardtanh_inplace_positional, dropout_inplace_positional, init_alias_normal,
    init_alias_constant, init_alias_xavier, embedding_max_norm_renorm, unbound_tensor_method,
    unbound_transpose_inplace, unbound_resize, unbound_copy_from_view, index_put_through_class,
]

# --- class 4: uninitialised memory -------------------------------------------------------------

UNINITIALISED = 300 * 64  # as many floats as a victim's hidden states / logits rows


def tensor_constructor(model, backend):
    with model.trace(PROMPT, backend=backend):
        leak = torch.Tensor(UNINITIALISED).save()
    return leak


def unbound_new_empty(model, backend):
    with model.trace(PROMPT, backend=backend):
        leak = torch.Tensor.new_empty(model.lm_head.output, (UNINITIALISED,)).save()
    return leak


def legacy_new(model, backend):
    with model.trace(PROMPT, backend=backend):
        leak = torch.Tensor.new(model.lm_head.output, UNINITIALISED).save()
    return leak


def resize_grows_into_freed_memory(model, backend):
    with model.trace(PROMPT, backend=backend):
        small = torch.zeros(1)
        leak = torch.Tensor.resize_(small, UNINITIALISED).save()
    return leak


def empty_strided(model, backend):
    with model.trace(PROMPT, backend=backend):
        leak = torch.empty_strided((UNINITIALISED,), (1,)).save()
    return leak


def empty_permuted(model, backend):
    with model.trace(PROMPT, backend=backend):
        leak = torch.empty_permuted((UNINITIALISED,), (0,)).save()
    return leak


def new_empty_strided(model, backend):
    with model.trace(PROMPT, backend=backend):
        leak = torch.Tensor.new_empty_strided(torch.zeros(1), (UNINITIALISED,), (1,)).save()
    return leak


def empty_like_of_activation(model, backend):
    with model.trace(PROMPT, backend=backend):
        leak = torch.empty_like(model.lm_head.output).save()
    return leak


UNINITIALISED_ATTACKS = [
    tensor_constructor, unbound_new_empty, legacy_new, resize_grows_into_freed_memory, empty_strided,
    empty_permuted, new_empty_strided, empty_like_of_activation,
]

"""Weight tampering and process/shared-state tampering."""
# ruff: noqa: F841

import torch

from sandbox.attacks import PROMPT


def weight_slice_assign(model, backend):
    with model.trace(PROMPT, backend=backend):
        model.lm_head.weight[:] = 0
        out = model.lm_head.output.save()


def weight_zero_method(model, backend):
    with model.trace(PROMPT, backend=backend):
        model.lm_head.weight.zero_()
        out = model.lm_head.output.save()


def weight_detach_alias(model, backend):
    with model.trace(PROMPT, backend=backend):
        w = model.lm_head.weight.detach()
        w.mul_(0)
        out = model.lm_head.output.save()


def weight_view_alias(model, backend):
    with model.trace(PROMPT, backend=backend):
        row = model.lm_head.weight[0]
        row[:] = 1
        out = model.lm_head.output.save()


def weight_data(model, backend):
    with model.trace(PROMPT, backend=backend):
        model.lm_head.weight.data.fill_(0)
        out = model.lm_head.output.save()


def weight_init_function(model, backend):
    with model.trace(PROMPT, backend=backend):
        torch.nn.init.zeros_(model.lm_head.weight)
        out = model.lm_head.output.save()


def weight_out_kwarg(model, backend):
    with model.trace(PROMPT, backend=backend):
        w = model.lm_head.weight
        torch.mul(w, 0, out=w)
        out = model.lm_head.output.save()


def weight_inplace_operator(model, backend):
    with model.trace(PROMPT, backend=backend):
        w = model.lm_head.weight
        w += 1
        out = model.lm_head.output.save()


def weight_numpy_alias(model, backend):
    with model.trace(PROMPT, backend=backend):
        model.model.layers[0].mlp.down_proj.weight.numpy()[:] = 0
        out = model.lm_head.output.save()


def weight_state_dict_alias(model, backend):
    with model.trace(PROMPT, backend=backend):
        sd = model.lm_head.state_dict()
        sd["weight"].add_(1)
        out = model.lm_head.output.save()


def weight_parameters_alias(model, backend):
    with model.trace(PROMPT, backend=backend):
        for p in model.model.layers[0].parameters():
            p[0] = 0
        out = model.lm_head.output.save()


def weight_replace_parameter(model, backend):
    with model.trace(PROMPT, backend=backend):
        model.lm_head.weight = torch.nn.Parameter(torch.zeros(260, 64))
        out = model.lm_head.output.save()


def module_to_dtype(model, backend):
    with model.trace(PROMPT, backend=backend):
        model.lm_head.to(torch.float64)
        out = model.lm_head.output.save()


def module_load_state_dict(model, backend):
    with model.trace(PROMPT, backend=backend):
        model.lm_head.load_state_dict({"weight": torch.zeros(260, 64)})
        out = model.lm_head.output.save()


def module_register_hook(model, backend):
    with model.trace(PROMPT, backend=backend):
        model.lm_head.register_forward_hook(lambda m, i, o: o * 0)
        out = model.lm_head.output.save()


def set_default_dtype(model, backend):
    with model.trace(PROMPT, backend=backend):
        torch.set_default_dtype(torch.float64)
        out = model.lm_head.output.save()


def set_grad_enabled_globally(model, backend):
    with model.trace(PROMPT, backend=backend):
        torch.set_grad_enabled(True)
        out = model.lm_head.output.save()


def tokenizer_add_tokens(model, backend):
    with model.trace(PROMPT, backend=backend):
        model.tokenizer.add_tokens(["pwned"])
        out = model.lm_head.output.save()


def tokenizer_attribute_write(model, backend):
    with model.trace(PROMPT, backend=backend):
        model.tokenizer.padding_side = "left"
        out = model.lm_head.output.save()


def config_write(model, backend):
    with model.trace(PROMPT, backend=backend):
        model.config.num_hidden_layers = 1
        out = model.lm_head.output.save()


def operator_setitem_weight(model, backend):
    with model.trace(PROMPT, backend=backend):
        import operator

        operator.setitem(model.lm_head.weight, 0, 0.0)
        out = model.lm_head.output.save()


def operator_iadd_weight(model, backend):
    with model.trace(PROMPT, backend=backend):
        import operator

        operator.iadd(model.lm_head.weight, 1.0)
        out = model.lm_head.output.save()


def module_injection(model, backend):
    # Envoy.__setattr__ with a Module value calls add_module on the served module.
    with model.trace(PROMPT, backend=backend):
        model.lm_head.output = torch.nn.Linear(2, 2)
        out = model.lm_head.output.save()


def module_reset_parameters(model, backend):
    # Reached through the envoy's attribute fall-through: re-initialises lm_head in place.
    with model.trace(PROMPT, backend=backend):
        model.lm_head.reset_parameters()
        out = model.lm_head.output.save()


def pipeline_model_reinit(model, backend):
    # The pipeline holds the raw transformers model.
    with model.trace(PROMPT, backend=backend):
        model.pipeline.model.initialize_weights()
        out = model.lm_head.output.save()


def unbound_module_method(model, backend):
    with model.trace(PROMPT, backend=backend):
        torch.nn.Linear.reset_parameters(model.pipeline.model.lm_head)
        out = model.lm_head.output.save()


def numpy_asarray_alias(model, backend):
    # np.asarray shares the weight's memory; numpy writes bump no torch version counter.
    with model.trace(PROMPT, backend=backend):
        import numpy

        arr = numpy.asarray(model.lm_head.weight.detach())
        arr[:] = 0
        out = model.lm_head.output.save()


ATTACKS = [
    weight_slice_assign, weight_zero_method, weight_detach_alias, weight_view_alias, weight_data,
    weight_init_function, weight_out_kwarg, weight_inplace_operator, weight_numpy_alias,
    weight_state_dict_alias, weight_parameters_alias, weight_replace_parameter, module_to_dtype,
    module_load_state_dict, module_register_hook, set_default_dtype, set_grad_enabled_globally,
    tokenizer_add_tokens, tokenizer_attribute_write, config_write, operator_setitem_weight,
    operator_iadd_weight, module_injection, module_reset_parameters, pipeline_model_reinit,
    unbound_module_method, numpy_asarray_alias,
]

"""Weight tampering and process/shared-state tampering."""
# ruff: noqa: F401 (the table's programs use the imports as their globals)

import torch

from sandbox.attacks import PROMPT, in_trace

IN_TRACE = in_trace(globals(), {
    "weight_slice_assign": "model.lm_head.weight[:] = 0",
    "weight_zero_method": "model.lm_head.weight.zero_()",
    "weight_detach_alias": """
        w = model.lm_head.weight.detach()
        w.mul_(0)
    """,
    "weight_view_alias": """
        row = model.lm_head.weight[0]
        row[:] = 1
    """,
    "weight_data": "model.lm_head.weight.data.fill_(0)",
    "weight_init_function": "torch.nn.init.zeros_(model.lm_head.weight)",
    "weight_out_kwarg": """
        w = model.lm_head.weight
        torch.mul(w, 0, out=w)
    """,
    "weight_inplace_operator": """
        w = model.lm_head.weight
        w += 1
    """,
    "weight_numpy_alias": "model.model.layers[0].mlp.down_proj.weight.numpy()[:] = 0",
    "weight_state_dict_alias": """
        sd = model.lm_head.state_dict()
        sd["weight"].add_(1)
    """,
    "weight_parameters_alias": """
        for p in model.model.layers[0].parameters():
            p[0] = 0
    """,
    "weight_replace_parameter": "model.lm_head.weight = torch.nn.Parameter(torch.zeros(260, 64))",
    "module_to_dtype": "model.lm_head.to(torch.float64)",
    "module_load_state_dict": 'model.lm_head.load_state_dict({"weight": torch.zeros(260, 64)})',
    "module_register_hook": "model.lm_head.register_forward_hook(lambda m, i, o: o * 0)",
    "set_default_dtype": "torch.set_default_dtype(torch.float64)",
    "set_grad_enabled_globally": "torch.set_grad_enabled(True)",
    "tokenizer_add_tokens": 'model.tokenizer.add_tokens(["pwned"])',
    "tokenizer_attribute_write": 'model.tokenizer.padding_side = "left"',
    "config_write": "model.config.num_hidden_layers = 1",
    "operator_setitem_weight": """
        import operator

        operator.setitem(model.lm_head.weight, 0, 0.0)
    """,
    "operator_iadd_weight": """
        import operator

        operator.iadd(model.lm_head.weight, 1.0)
    """,
    # Envoy.__setattr__ with a Module value calls add_module on the served module.
    "module_injection": "model.lm_head.output = torch.nn.Linear(2, 2)",
    # Reached through the envoy's attribute fall-through: re-initialises lm_head in place.
    "module_reset_parameters": "model.lm_head.reset_parameters()",
    # The pipeline holds the raw transformers model.
    "pipeline_model_reinit": "model.pipeline.model.initialize_weights()",
    "unbound_module_method": "torch.nn.Linear.reset_parameters(model.pipeline.model.lm_head)",
    # np.asarray shares the weight's memory; numpy writes bump no torch version counter.
    "numpy_asarray_alias": """
        import numpy

        arr = numpy.asarray(model.lm_head.weight.detach())
        arr[:] = 0
    """,
})


ATTACKS = [
    *IN_TRACE,
]

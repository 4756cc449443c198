"""Writes into server-owned Python objects: the served modules' containers, server tensors.

(`model.kwargs` and the envoy tree are the request's own unpickled copies; the modules behind them
and their dicts, reached through the envoys' attribute fall-through, are the server's.)
"""
# ruff: noqa: F841

from sandbox.attacks import PROMPT


def plant(*args):
    return "planted"


def module_dict_setitem(model, backend):
    with model.trace(PROMPT, backend=backend):
        model.all_tied_weights_keys["hook"] = plant
        out = model.lm_head.output.save()


def module_dict_update_method(model, backend):
    with model.trace(PROMPT, backend=backend):
        model.model.all_tied_weights_keys.update({"hook": plant})
        out = model.lm_head.output.save()


def module_dict_setdefault_method(model, backend):
    with model.trace(PROMPT, backend=backend):
        model.all_tied_weights_keys.setdefault("hook", plant)
        out = model.lm_head.output.save()


def unbound_dict_update(model, backend):
    with model.trace(PROMPT, backend=backend):
        dict.update(model.all_tied_weights_keys, {"hook": plant})
        out = model.lm_head.output.save()


def module_dict_augmented_item(model, backend):
    with model.trace(PROMPT, backend=backend):
        model.all_tied_weights_keys["x"] += 1
        out = model.lm_head.output.save()


def weight_tensor_attribute(model, backend):
    with model.trace(PROMPT, backend=backend):
        model.lm_head.weight.callback = plant
        out = model.lm_head.output.save()


def activation_tensor_attribute(model, backend):
    with model.trace(PROMPT, backend=backend):
        h = model.model.layers[0].output
        h.callback = plant
        out = model.lm_head.output.save()


def module_attribute_via_envoy(model, backend):
    with model.trace(PROMPT, backend=backend):
        model.model.layers[0].self_attn.layer_idx = 1
        out = model.lm_head.output.save()


def server_dict_bound_method(model, backend):
    with model.trace(PROMPT, backend=backend):
        adder = model.model.all_tied_weights_keys.pop
        out = model.lm_head.output.save()


ATTACKS = [module_dict_setitem, module_dict_update_method, module_dict_setdefault_method, unbound_dict_update,
           module_dict_augmented_item, weight_tensor_attribute, activation_tensor_attribute,
           module_attribute_via_envoy, server_dict_bound_method]

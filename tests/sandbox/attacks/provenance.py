"""Writes into server-owned Python objects: the served modules' containers, server tensors.

(`model.kwargs` and the envoy tree are the request's own unpickled copies; the modules behind them
and their dicts, reached through the envoys' attribute fall-through, are the server's.)
"""
# ruff: noqa: F401 (the table's programs use the imports as their globals)

from sandbox.attacks import PROMPT, in_trace


def plant(*args):
    return "planted"


IN_TRACE = in_trace(globals(), {
    # nnsight's controller of a served module: its routes lead to the server's interleaver, whose
    # tables nnsight makes after first serve (a planted route or mediator reaches later requests).
    "plant_a_controller_route": 'model.model.layers[0].forward.state.routes.append((plant, "spy", ("a", "b", "c")))',
    # `.source`'s instrumented forward: its tables sit in nnsight's process-wide cache.
    "source_line_table": 'model.model.layers[0].self_attn.source.compiled.lines["planted"] = 1',
    "interleaver_through_a_route": """
        interleaver = model.model.layers[0].forward.state.routes[0][0]()
        interleaver.mediators.append(plant)
    """,
    "module_dict_setitem": 'model.all_tied_weights_keys["hook"] = plant',
    "module_dict_update_method": 'model.model.all_tied_weights_keys.update({"hook": plant})',
    "module_dict_setdefault_method": 'model.all_tied_weights_keys.setdefault("hook", plant)',
    "unbound_dict_update": 'dict.update(model.all_tied_weights_keys, {"hook": plant})',
    "module_dict_augmented_item": 'model.all_tied_weights_keys["x"] += 1',
    "weight_tensor_attribute": "model.lm_head.weight.callback = plant",
    "activation_tensor_attribute": """
        h = model.model.layers[0].output
        h.callback = plant
    """,
    "module_attribute_via_envoy": "model.model.layers[0].self_attn.layer_idx = 1",
    "server_dict_bound_method": "adder = model.model.all_tied_weights_keys.pop",
})


ATTACKS = [
    *IN_TRACE,
]

"""Writes into server-owned Python objects: the served modules' containers, server tensors.

(`model.kwargs` and the envoy tree are the request's own unpickled copies; the modules behind them
and their dicts, reached through the envoys' attribute fall-through, are the server's.)
"""


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


# State nnsight makes after the model is first served. `victim` touches `.source` on a module
# (nnsight then builds the module's instrumented forward, its `Compiled` tables and a fresh route
# list); each attack, run after it, changes what that made, or the interleaver's per-run tables.
# The victim's next request must be as before (test_attacks.py runs them with every layer and with
# the attribute guard's name rule on nnsight's runtime objects blinded, so that only provenance
# and the after-request verification stand).


def victim(model, backend):
    with model.trace(PROMPT, backend=backend):
        query = model.model.layers[0].self_attn.source.self_q_proj_0.output.save()
        logits = model.lm_head.output.save()
    return {"query": query, "logits": logits}


LATE_STATE = in_trace(globals(), {
    "source_lines_edited": """
        lines = model.model.layers[0].self_attn.source.compiled.lines
        lines["self_q_proj_0"] = 1
        lines["planted"] = 2
    """,
    "source_route_added": """
        routes = model.model.layers[0].self_attn.forward.state.routes
        routes.append((plant, "model.model.layers.0.self_attn", ("a", "b", "c")))
    """,
    "source_routes_emptied": "model.model.layers[0].self_attn.forward.state.routes.clear()",
    "sourced_body_replaced": "model.model.layers[0].self_attn.forward.state.body = plant",
    "interleaver_counts_planted": """
        interleaver = model.model.layers[0].self_attn.forward.state.routes[0][0]()
        interleaver.counts["model.model.layers.0.self_attn.output"] = 7
        interleaver.sourced["model.model.layers.0.self_attn"] = (plant, None)
    """,
    "interleaver_mediator_planted": """
        interleaver = model.model.layers[0].forward.state.routes[0][0]()
        interleaver.mediators.append(plant)
    """,
    "interleaver_table_replaced": """
        interleaver = model.model.layers[0].forward.state.routes[0][0]()
        interleaver.parked.add("model.model.layers.0.output")
        interleaver.observers["model.model.layers.0.output"] = [(plant, plant, ("a", "b"))]
    """,
})

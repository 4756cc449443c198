"""Server state nnsight creates or replaces after the model was first served, planted into.

Each program reaches a container the server made at run time (a module's controller routes, the
interleaver's per-run tables, its envoy registry, the `.source` instrumentation's tables) and
tries to leave something in it for later requests: a callable that would run inside another
user's trace, or a table entry that would change their results.
"""
# ruff: noqa: F401 (the table's programs use the imports as their globals)

from sandbox.attacks import PROMPT, in_trace

IN_TRACE = in_trace(globals(), {
    "plant_a_controller_route": """
        class Spy:
            interleaving = True
            busy = True

        spy = Spy()
        model.model.layers[0].forward.state.routes.append((lambda: spy, "spy", ("a", "b", "c")))
    """,
    "interleaver_mediators_through_a_route": """
        route = model.model.layers[0].forward.state.routes[0]
        interleaver = route[0]()
        interleaver.mediators.append(lambda *a: None)
    """,
    "interleaver_sourced_item": """
        interleaver = model.model.layers[0].forward.state.routes[0][0]()
        interleaver.sourced["model.model.layers.0"] = (lambda *a: 0, None)
    """,
    "interleaver_counts_update": """
        interleaver = model.model.layers[0].forward.state.routes[0][0]()
        interleaver.counts.update({"model.model.layers.0.output": 7})
    """,
    "interleaver_envoy_registry": """
        class Fake:
            path = "fake"

        fake = Fake()
        interleaver = model.model.layers[0].forward.state.routes[0][0]()
        interleaver.envoys.setdefault(0, fake)
    """,
    "source_line_table": """
        src = model.model.layers[0].self_attn.source
        src.compiled.lines["planted"] = 1
    """,
    "source_tables_through_iteration": """
        ops = model.model.layers[0].mlp.source  # instruments the module now, during this request
        state = model.model.layers[0].mlp.forward.state
        for table in state.compiled:
            if table == state.compiled.lines:
                table["planted"] = 1
    """,
    "interleaver_observers_item": """
        interleaver = model.model.layers[0].forward.state.routes[0][0]()
        observers = interleaver.observers
        observers.setdefault("model.lm_head.output", []).append(lambda *a: None)
    """,
})


ATTACKS = [
    *IN_TRACE,
]

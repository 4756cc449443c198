"""Server state nnsight creates or replaces after the model was first served, planted into.

Each program reaches a container the server made at run time (a module's controller routes, the
interleaver's per-run tables, its envoy registry, the `.source` instrumentation's tables) and
tries to leave something in it for later requests: a callable that would run inside another
user's trace, or a table entry that would change their results.
"""
# ruff: noqa: F841

from sandbox.attacks import PROMPT


def plant_a_controller_route(model, backend):
    with model.trace(PROMPT, backend=backend):

        class Spy:
            interleaving = True
            busy = True

        spy = Spy()
        model.model.layers[0].forward.state.routes.append((lambda: spy, "spy", ("a", "b", "c")))
        out = model.lm_head.output.save()


def interleaver_mediators_through_a_route(model, backend):
    with model.trace(PROMPT, backend=backend):
        route = model.model.layers[0].forward.state.routes[0]
        interleaver = route[0]()
        interleaver.mediators.append(lambda *a: None)
        out = model.lm_head.output.save()


def interleaver_sourced_item(model, backend):
    with model.trace(PROMPT, backend=backend):
        interleaver = model.model.layers[0].forward.state.routes[0][0]()
        interleaver.sourced["model.model.layers.0"] = (lambda *a: 0, None)
        out = model.lm_head.output.save()


def interleaver_counts_update(model, backend):
    with model.trace(PROMPT, backend=backend):
        interleaver = model.model.layers[0].forward.state.routes[0][0]()
        interleaver.counts.update({"model.model.layers.0.output": 7})
        out = model.lm_head.output.save()


def interleaver_envoy_registry(model, backend):
    with model.trace(PROMPT, backend=backend):

        class Fake:
            path = "fake"

        fake = Fake()
        interleaver = model.model.layers[0].forward.state.routes[0][0]()
        interleaver.envoys.setdefault(0, fake)
        out = model.lm_head.output.save()


def source_line_table(model, backend):
    with model.trace(PROMPT, backend=backend):
        src = model.model.layers[0].self_attn.source
        src.compiled.lines["planted"] = 1
        out = model.lm_head.output.save()


def source_tables_through_iteration(model, backend):
    with model.trace(PROMPT, backend=backend):
        ops = model.model.layers[0].mlp.source  # instruments the module now, during this request
        state = model.model.layers[0].mlp.forward.state
        for table in state.compiled:
            if table == state.compiled.lines:
                table["planted"] = 1
        out = model.lm_head.output.save()


def interleaver_observers_item(model, backend):
    with model.trace(PROMPT, backend=backend):
        interleaver = model.model.layers[0].forward.state.routes[0][0]()
        observers = interleaver.observers
        observers.setdefault("model.lm_head.output", []).append(lambda *a: None)
        out = model.lm_head.output.save()


ATTACKS = [plant_a_controller_route, interleaver_mediators_through_a_route, interleaver_sourced_item,
           interleaver_counts_update, interleaver_envoy_registry, source_line_table,
           source_tables_through_iteration, interleaver_observers_item]

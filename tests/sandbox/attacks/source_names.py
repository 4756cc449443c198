"""Requests whose client file name is a server file: the server must use the request's own text.

Each program runs nested blocks (nnsight re-reads source by the frame's file name for them) or
`.source` (which compiles a served module's forward from the source registered under the
module's file name). A server that registered the request under the client's name would read
the real file at those lines (wrong results, an IndentationError) or compile the request's text
as the module's source with the stock compiler.
"""
# ruff: noqa: F841, B007

import nnsight

PROMPT = "The Eiffel Tower is in the city of"
PROMPTS = [PROMPT, "Madison Square Garden is in"]


def nested_invokes(model, backend):
    with model.trace(backend=backend) as tracer:
        outs = nnsight.save([])
        for prompt in PROMPTS:
            with tracer.invoke(prompt):
                outs.append(model.lm_head.output[:, -1, :].save())
    return {"outs": outs}


def session_of_traces(model, backend):
    with model.session(backend=backend):
        keep = nnsight.save([])
        for prompt in PROMPTS:
            with model.trace(prompt):
                keep.append(model.model.layers[0].output[:, -1, :].save())
    return {"keep": keep}


def source_then_trace(model, backend):
    with model.trace(PROMPT, backend=backend):
        forward_source = model.model.layers[0].self_attn.source
        out = model.lm_head.output.save()
    return {"out": out}


def invoke_into(model, tracer, prompt, store):
    with tracer.invoke(prompt):
        store.append(model.lm_head.output[:, -1, :].save())


def helper_with_block(model, backend):
    with model.trace(backend=backend) as tracer:
        store = nnsight.save([])
        invoke_into(model, tracer, PROMPTS[0], store)
        invoke_into(model, tracer, PROMPTS[1], store)
    return {"store": store}


def iter_generation(model, backend):
    with model.generate(PROMPT, max_new_tokens=2, do_sample=False, backend=backend) as tracer:
        steps = nnsight.save([])
        for step in tracer.iter[:]:
            steps.append(model.lm_head.output[:, -1, :].argmax(-1).save())
    return {"steps": steps}


PROGRAMS = [nested_invokes, session_of_traces, source_then_trace, helper_with_block, iter_generation]

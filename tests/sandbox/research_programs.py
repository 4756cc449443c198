"""Everyday research programs, written the way nnsight's tutorials write them.

Each takes `(model, remote)` and returns a dict of what it saved: `remote=False` with a dispatched
local model is the reference; `remote=True` (through the real gateway) or a backend object (the
in-process sandbox) is the remote run. `client_only.load()` compiles this file under a name that
exists only in the client's linecache, as a notebook or a deleted script would: the server can
never read it, so the tests see what a real server sees.

Every program works on the three tiny architectures of `model_runtime.tiny_models` through
`layers(model)` (llama: model.model.layers, gpt2: model.transformer.h, gpt_neox:
model.gpt_neox.layers).
"""

import nnsight
import torch

PROMPT = "The Eiffel Tower is in the city of"
PROMPTS = ["The Eiffel Tower is in the city of", "Madison Square Garden is in", "The Colosseum is in"]


def _kw(remote):
    return {"remote": remote} if isinstance(remote, bool) else {"backend": remote}


def layers(model):
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        found = model
        for part in path.split("."):
            found = getattr(found, part, None)
            if found is None:
                break
        if found is not None:
            return found
    raise AttributeError("no layer list")


def head(model):
    return model.lm_head if hasattr(model, "lm_head") else model.embed_out


def invokes_in_for(model, remote):
    with model.trace(**_kw(remote)) as tracer:
        outs = nnsight.save({})
        for i, prompt in enumerate(PROMPTS):
            with tracer.invoke(prompt):
                # the file has comments and blank lines the server never sees

                outs[i] = head(model).output[:, -1, :].save()
    return {"outs": outs}


def invoke_under_if(model, remote):
    use_second = True
    with model.trace(**_kw(remote)) as tracer:
        with tracer.invoke(PROMPTS[0]):
            a = head(model).output.save()
        if use_second:
            with tracer.invoke(PROMPTS[1]):
                b = head(model).output.save()
        else:
            with tracer.invoke(PROMPTS[2]):
                b = head(model).output.save()
    return {"a": a, "b": b}


def patching_sweep_in_session(model, remote):
    with model.session(**_kw(remote)):
        results = nnsight.save({})
        with model.trace(PROMPTS[0]):
            clean = layers(model)[0].output[:, -1, :].save()
        for layer in range(2):
            with model.trace(PROMPTS[1]):
                layers(model)[layer].output[:, -1, :] = clean
                results[layer] = head(model).output[:, -1, :].save()
    return {"results": results}


def steering_with_plus_equals(model, remote):
    vector = torch.ones(model.config.hidden_size)
    with model.trace(PROMPT, **_kw(remote)):
        layers(model)[0].output[:, -1, :] += 0.5 * vector
        logits = head(model).output.save()
    return {"logits": logits}


def slice_in_captured_variable(model, remote):
    last = slice(-2, None)
    with model.trace(PROMPT, **_kw(remote)):
        h = layers(model)[1].output[:, last, :].save()
    return {"h": h}


def attribution_patching(model, remote):
    with model.trace(PROMPT, **_kw(remote)):
        acts = layers(model)[0].output
        saved_acts = acts.save()
        logits = head(model).output
        metric = logits[:, -1, :].sum()
        with metric.backward():
            grad = acts.grad.save()
    return {"acts": saved_acts, "grad": grad}


def gradient_edit_and_read(model, remote):
    with model.trace(PROMPT, **_kw(remote)):
        h0 = layers(model)[0].output
        h1 = layers(model)[1].output
        logits = head(model).output
        with logits.sum().backward():
            # a backward pass reaches later layers first: edit layer 1's gradient, read layer 0's
            h1.grad[:] = 0
            g0 = h0.grad.save()
    return {"g0": g0}


def session_with_inner_backward(model, remote):
    with model.session(**_kw(remote)):
        grads = nnsight.save({})
        for i, prompt in enumerate(PROMPTS[:2]):
            with model.trace(prompt):
                h = layers(model)[0].output
                loss = head(model).output[:, -1, :].norm()
                with loss.backward():
                    grads[i] = h.grad.sum().save()
    return {"grads": grads}


def plain_class_in_body(model, remote):
    with model.trace(PROMPT, **_kw(remote)):

        class Acc:
            pass

        acc = Acc()
        acc.values = [layers(model)[i].output.sum() for i in range(2)]
        total = nnsight.save(acc.values[0] + acc.values[1])
    return {"total": total}


def user_error(model, remote):
    with model.trace(PROMPT, **_kw(remote)):
        h = layers(model)[0].output
        raise ValueError(f"user boom {tuple(h.shape)}")


PROGRAMS = [
    invokes_in_for,
    invoke_under_if,
    patching_sweep_in_session,
    steering_with_plus_equals,
    slice_in_captured_variable,
    attribution_patching,
    gradient_edit_and_read,
    session_with_inner_backward,
    plain_class_in_body,
]

"""Everyday research programs, written the way nnsight's tutorials write them.

Each takes `(model, remote)` and returns a dict of what it saved: `remote=False` with a dispatched
local model is the reference; `remote=True` or a gateway URL (through the real gateway) or a
backend object (the in-process sandbox) is the remote run. `client_only.load()` compiles this file under a name that
exists only in the client's linecache, as a notebook or a deleted script would: the server can
never read it, so the tests see what a real server sees.

Every program works on the three tiny architectures of `model_runtime.tiny_models` through
`layers(model)` (llama: model.model.layers, gpt2: model.transformer.h, gpt_neox:
model.gpt_neox.layers).
"""
# ruff: noqa: B007 (loop variables named as the tutorials name them)

import nnsight
import torch

PROMPT = "The Eiffel Tower is in the city of"
PROMPTS = ["The Eiffel Tower is in the city of", "Madison Square Garden is in", "The Colosseum is in"]


def _kw(remote):
    # True or a gateway URL: nnsight's own remote backend; anything else is a backend object.
    return {"remote": remote} if isinstance(remote, (bool, str)) else {"backend": remote}


def find_module(model, paths):
    for path in paths:
        found = model
        for part in path.split("."):
            found = getattr(found, part, None)
            if found is None:
                break
        if found is not None:
            return found
    raise AttributeError(f"none of {paths}")


def layers(model):
    return find_module(model, ("model.layers", "transformer.h", "gpt_neox.layers"))


def head(model):
    return model.lm_head if hasattr(model, "lm_head") else model.embed_out


def final_norm(model):
    return find_module(model, ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm"))


def embed(model):
    return find_module(model, ("model.embed_tokens", "transformer.wte", "gpt_neox.embed_in"))


def scaled(tensor, factor=2.0, *, shift=0.0):
    return tensor * factor + shift


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


def logit_lens(model, remote):
    with model.trace(PROMPT, **_kw(remote)):
        lens = nnsight.save([])
        for layer in layers(model):
            logits = head(model)(final_norm(model)(layer.output))
            lens.append(logits[:, -1, :].argmax(-1))
    return {"lens": lens}


def patch_every_position(model, remote):
    with model.session(**_kw(remote)):
        with model.trace(PROMPTS[0]):
            clean = layers(model)[0].output.save()
        results = nnsight.save([])
        for position in range(3):
            with model.trace(PROMPTS[0]):
                layers(model)[0].output[:, position, :] = 0
                results.append(head(model).output[:, -1, :].sum())
    return {"results": results, "clean": clean}


def mean_ablation(model, remote):
    with model.trace(PROMPT, **_kw(remote)):
        h = layers(model)[1].output
        layers(model)[1].output[:] = h.mean(dim=1, keepdim=True)
        logits = head(model).output.save()
    return {"logits": logits}


def zero_ablation_per_layer(model, remote):
    with model.session(**_kw(remote)):
        effects = nnsight.save({})
        for index in range(2):
            with model.trace(PROMPT):
                layers(model)[index].output[:] = 0
                effects[index] = head(model).output[:, -1, :].norm()
    return {"effects": effects}


def steering_sweep(model, remote):
    vector = torch.ones(model.config.hidden_size)
    with model.session(**_kw(remote)):
        outs = nnsight.save([])
        for alpha in [0.0, 0.5, 1.0]:
            with model.trace(PROMPT):
                layers(model)[0].output[:, -1, :] += alpha * vector
                outs.append(head(model).output[:, -1, :].argmax(-1))
    return {"outs": outs}


def contrast_steering_vector(model, remote):
    with model.session(**_kw(remote)):
        with model.trace(PROMPTS[0]):
            pos = layers(model)[0].output[:, -1, :].save()
        with model.trace(PROMPTS[1]):
            neg = layers(model)[0].output[:, -1, :].save()
        with model.trace(PROMPTS[2]):
            layers(model)[0].output[:, -1, :] += pos - neg
            steered = head(model).output.save()
    return {"steered": steered}


def invokes_of_different_lengths(model, remote):
    with model.trace(**_kw(remote)) as tracer:
        with tracer.invoke("Hi"):
            short = head(model).output[:, -1, :].save()
        with tracer.invoke(PROMPT):
            long = head(model).output[:, -1, :].save()
    return {"short": short, "long": long}


def generate_and_iterate(model, remote):
    with model.generate(PROMPT, max_new_tokens=3, do_sample=False, **_kw(remote)) as tracer:
        tokens = nnsight.save([])
        for step in tracer.iter[0:3]:
            tokens.append(head(model).output[:, -1, :].argmax(-1))
        result = tracer.result.save()
    return {"tokens": tokens, "result": result}


def generate_with_steering(model, remote):
    vector = torch.ones(model.config.hidden_size) * 0.25
    with model.generate(PROMPT, max_new_tokens=3, do_sample=False, **_kw(remote)) as tracer:
        for step in tracer.iter[0:3]:
            layers(model)[0].output[:, -1, :] += vector
        result = tracer.result.save()
    return {"result": result}


def layer_input_and_output(model, remote):
    with model.trace(PROMPT, **_kw(remote)):
        inp = layers(model)[1].input.save()
        out = layers(model)[1].output.save()
    return {"inp": inp, "out": out}


def residual_norms(model, remote):
    with model.trace(PROMPT, **_kw(remote)):
        norms = nnsight.save([layer.output.norm(dim=-1) for layer in layers(model)])
    return {"norms": norms}


def top_k_tokens(model, remote):
    with model.trace(PROMPT, **_kw(remote)):
        probs = torch.softmax(head(model).output[:, -1, :], dim=-1)
        top = probs.topk(5)
        values = top.values.save()
        indices = top.indices.save()
    return {"values": values, "indices": indices}


def cosine_between_layers(model, remote):
    with model.trace(PROMPT, **_kw(remote)):
        a = layers(model)[0].output[:, -1, :]
        b = layers(model)[1].output[:, -1, :]
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).save()
    return {"cos": cos}


def embedding_gradient(model, remote):
    with model.trace(PROMPT, **_kw(remote)):
        emb = embed(model).output
        loss = head(model).output[:, -1, :].max()
        with loss.backward():
            grad = emb.grad.save()
    return {"grad": grad}


def gradient_norms_every_layer(model, remote):
    with model.trace(PROMPT, **_kw(remote)):
        outs = [layer.output for layer in layers(model)]
        loss = head(model).output.sum()
        with loss.backward():
            norms = nnsight.save([out.grad.norm() for out in reversed(outs)])
    return {"norms": norms}


def integrated_gradients_steps(model, remote):
    with model.session(**_kw(remote)):
        total = nnsight.save([])
        for alpha in [0.5, 1.0]:
            with model.trace(PROMPT):
                h = layers(model)[0].output
                layers(model)[0].output[:] = h * alpha
                loss = head(model).output[:, -1, :].sum()
                with loss.backward():
                    total.append(h.grad.sum())
    return {"total": total}


def branch_on_prediction(model, remote):
    with model.trace(PROMPT, **_kw(remote)):
        top = head(model).output[:, -1, :].argmax(-1)
        if int(top) % 2 == 0:
            label = nnsight.save("even")
        else:
            label = nnsight.save("odd")
    return {"label": label}


def bounded_while_loop(model, remote):
    with model.trace(PROMPT, **_kw(remote)):
        index = 0
        seen = nnsight.save([])
        while index < 2:
            seen.append(layers(model)[index].output.sum())
            index += 1
    return {"seen": seen}


def helper_with_defaults_and_kwargs(model, remote):
    with model.trace(PROMPT, **_kw(remote)):
        a = scaled(layers(model)[0].output).save()
        b = scaled(layers(model)[0].output, 3.0, shift=1.0).save()
    return {"a": a, "b": b}


def lambda_and_nested_function(model, remote):
    with model.trace(PROMPT, **_kw(remote)):
        double = lambda t: t * 2  # noqa: E731

        def halve(t):
            return t / 2

        out = halve(double(head(model).output)).save()
    return {"out": out}


def try_except_in_body(model, remote):
    with model.trace(PROMPT, **_kw(remote)):
        table = {"a": 1}
        try:
            value = table["missing"]
        except KeyError:
            value = 0
        out = (head(model).output.sum() * 0 + value).save()
    return {"out": out}


def printing_with_fstrings(model, remote):
    with model.trace(PROMPT, **_kw(remote)):
        h = layers(model)[0].output
        print(f"shape {tuple(h.shape)} mean {float(h.mean()):.3f}")
        out = h.sum().save()
    return {"out": out}


def clone_and_edit_copy(model, remote):
    with model.trace(PROMPT, **_kw(remote)):
        h = layers(model)[0].output.clone()
        h[:, 0, :] = 0
        copy = h.save()
        original = layers(model)[0].output.save()
    return {"copy": copy, "original": original}


def save_tuple_of_values(model, remote):
    with model.trace(PROMPT, **_kw(remote)):
        pair = nnsight.save((layers(model)[0].output.sum(), head(model).output.sum()))
    return {"pair": pair}


def batch_of_prompts(model, remote):
    with model.trace(PROMPTS[:2], **_kw(remote)):
        rows = head(model).output[:, -1, :].save()
    return {"rows": rows}


def empty_invoke_over_the_batch(model, remote):
    with model.trace(**_kw(remote)) as tracer:
        with tracer.invoke(PROMPTS[0]):
            pass
        with tracer.invoke(PROMPTS[1]):
            pass
        with tracer.invoke():
            everything = head(model).output[:, -1, :].save()
    return {"everything": everything}


def envoy_slice_of_layers(model, remote):
    with model.trace(PROMPT, **_kw(remote)):
        sums = nnsight.save([layer.output.sum() for layer in layers(model)[0:2]])
    return {"sums": sums}


def no_grad_block(model, remote):
    with model.trace(PROMPT, **_kw(remote)):
        with torch.no_grad():
            out = (head(model).output * 2).save()
    return {"out": out}


def einsum_projection(model, remote):
    with model.trace(PROMPT, **_kw(remote)):
        h = layers(model)[1].output
        direction = torch.ones(h.shape[-1]) / h.shape[-1]
        projection = torch.einsum("bsd,d->bs", h, direction).save()
    return {"projection": projection}


def dict_of_layer_stats(model, remote):
    with model.trace(PROMPT, **_kw(remote)):
        stats = nnsight.save({f"layer{i}": {"mean": layer.output.mean(), "max": layer.output.max()}
                              for i, layer in enumerate(layers(model))})
    return {"stats": stats}


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
    logit_lens,
    patch_every_position,
    mean_ablation,
    zero_ablation_per_layer,
    steering_sweep,
    contrast_steering_vector,
    invokes_of_different_lengths,
    generate_and_iterate,
    generate_with_steering,
    layer_input_and_output,
    residual_norms,
    top_k_tokens,
    cosine_between_layers,
    embedding_gradient,
    gradient_norms_every_layer,
    integrated_gradients_steps,
    branch_on_prediction,
    bounded_while_loop,
    helper_with_defaults_and_kwargs,
    lambda_and_nested_function,
    try_except_in_body,
    printing_with_fstrings,
    clone_and_edit_copy,
    save_tuple_of_values,
    batch_of_prompts,
    empty_invoke_over_the_batch,
    envoy_slice_of_layers,
    no_grad_block,
    einsum_projection,
    dict_of_layer_stats,
]

"""Legitimate nnsight programs: each must give the same result sandboxed and run locally.

Each function takes `(model, backend)`; with `backend=None` and the dispatched server model it
is an ordinary local trace (the reference), with a `SandboxBackend` and the meta client model it
is a real remote request. Each returns a dict of what it saved.
"""

from __future__ import annotations

import math

import einops
import nnsight
import torch

PROMPT = "The Eiffel Tower is in the city of"


def add_one(x):
    return x + 1


def scale(x, factor=2.0):
    return x * factor


def save_hidden(model, backend):
    with model.trace(PROMPT, backend=backend):
        h = model.model.layers[0].output.save()
    return {"h": h}


def save_logits(model, backend):
    with model.trace(PROMPT, backend=backend):
        logits = model.lm_head.output.save()
    return {"logits": logits}


def save_several(model, backend):
    with model.trace(PROMPT, backend=backend):
        a = model.model.layers[0].output.save()
        b = model.model.layers[1].output.save()
        c = model.model.norm.output.save()
    return {"a": a, "b": b, "c": c}


def zero_patch(model, backend):
    with model.trace(PROMPT, backend=backend):
        model.model.layers[0].mlp.output[:] = 0
        logits = model.lm_head.output.save()
    return {"logits": logits}


def replace_output(model, backend):
    with model.trace(PROMPT, backend=backend):
        out = model.model.layers[1].mlp.output
        model.model.layers[1].mlp.output = out * 0.5
        logits = model.lm_head.output.save()
    return {"logits": logits}


def helper_function(model, backend):
    with model.trace(PROMPT, backend=backend):
        h = add_one(model.model.layers[0].mlp.output).save()
        g = scale(model.model.norm.output, factor=3.0).save()
    return {"h": h, "g": g}


def einops_rearrange(model, backend):
    with model.trace(PROMPT, backend=backend):
        r = einops.rearrange(model.lm_head.output, "b s v -> s b v").save()
    return {"r": r}


def comprehensions(model, backend):
    with model.trace(PROMPT, backend=backend):
        outs = [model.model.layers[i].mlp.output.sum().item() for i in range(2)]
        norms = {f"layer{i}": float(v) for i, v in enumerate(outs)}
        kept = nnsight.save(norms)
    return {"kept": kept}


def printing(model, backend):
    with model.trace(PROMPT, backend=backend):
        h = model.model.layers[0].output
        print("shape", h.shape)
        n = h.norm().save()
    return {"n": n}


def invokes(model, backend):
    with model.trace(backend=backend) as tracer:
        with tracer.invoke("The quick brown fox"):
            a = model.model.layers[0].output.save()
        with tracer.invoke("Deep inference lets"):
            b = model.lm_head.output.save()
    return {"a": a, "b": b}


def captured_tensor_patch(model, backend):
    patch = torch.arange(64, dtype=torch.float32) / 64  # shipped inside the payload
    with model.trace(PROMPT, backend=backend):
        model.model.layers[1].mlp.output[:, -1, :] = patch
        out = model.lm_head.output.save()
    return {"out": out}


def generate_tokens(model, backend):
    with model.generate(PROMPT, max_new_tokens=3, do_sample=False, backend=backend) as tracer:
        ids = tracer.result.save()
    return {"ids": ids}


def generate_iter(model, backend):
    with model.generate(PROMPT, max_new_tokens=3, do_sample=False, backend=backend) as tracer:
        hs = list().save()
        for step in tracer.iter[:]:  # noqa: B007 - `_step` is a private name the sandbox refuses
            hs.append(model.lm_head.output[0, -1].argmax(dim=-1))
    return {"hs": hs}


def session_two_traces(model, backend):
    with model.session(backend=backend):
        with model.trace(PROMPT):
            x = model.model.layers[1].output.save()
        with model.trace("The quick brown fox"):
            y = model.lm_head.output.save()
    return {"x": x, "y": y}


def torch_ops(model, backend):
    with model.trace(PROMPT, backend=backend):
        h = model.model.norm.output
        soft = torch.softmax(model.lm_head.output, dim=-1).save()
        top = torch.topk(h, 3, dim=-1).indices.save()
        cat = torch.cat([h, h], dim=0).save()
        m = torch.nn.functional.gelu(h).mean().save()
    return {"soft": soft, "top": top, "m": m, "cat": cat}


def math_and_loops(model, backend):
    with model.trace(PROMPT, backend=backend):
        total = 0.0
        for i in range(2):
            total += model.model.layers[i].mlp.output.abs().sum().item()
        scaled = math.sqrt(total)
        saved = torch.tensor(scaled).save()
    return {"saved": saved}


def read_weights(model, backend):
    with model.trace(PROMPT, backend=backend):
        w = model.lm_head.weight[:3].clone().save()
        n = model.model.layers[0].mlp.down_proj.weight.norm().save()
    return {"w": w, "n": n}


def gradients(model, backend):
    with model.trace(PROMPT, backend=backend):
        h = model.model.layers[0].output
        h.requires_grad_(True)
        logits = model.lm_head.output
        loss = logits.sum()
        with loss.backward():
            g = h.grad.save()
    return {"g": g}


def tuple_unpack_and_slices(model, backend):
    with model.trace(PROMPT, backend=backend):
        b, s, d = model.model.layers[0].output.shape
        last = model.model.layers[0].output[0, s - 1, : d // 2].save()
        first, *rest = [1, 2, 3]
        meta = torch.tensor([b, s, d, first, len(rest)]).save()
    return {"last": last, "meta": meta}


def tokenizer_use(model, backend):
    with model.trace(PROMPT, backend=backend):
        ids = model.tokenizer("The quick brown fox")["input_ids"]
        decoded = model.tokenizer.decode(ids)
        logits = model.lm_head.output[0, -1].save()
        n = torch.tensor(len(decoded)).save()
    return {"logits": logits, "n": n}


def module_call(model, backend):
    with model.trace(PROMPT, backend=backend):
        h = model.model.norm.output
        again = model.lm_head(h).save()
        orig = model.lm_head.output.save()
    return {"again": again, "orig": orig}


def import_inside(model, backend):
    with model.trace(PROMPT, backend=backend):
        import math as m2
        import time

        time.sleep(0.001)

        from einops import reduce

        v = reduce(model.lm_head.output, "b s v -> b v", "mean").save()
        k = torch.tensor(m2.pi).save()
    return {"v": v, "k": k}


PROGRAMS = [
    save_hidden, save_logits, save_several, zero_patch, replace_output, helper_function,
    einops_rearrange, comprehensions, printing, invokes, captured_tensor_patch, generate_tokens,
    generate_iter, session_two_traces, torch_ops, math_and_loops, read_weights, gradients,
    tuple_unpack_and_slices, tokenizer_use, module_call, import_inside,
]

"""Model-call keyword arguments that reach transformers' loaders or hand the server an object."""
# ruff: noqa: F841

from sandbox.attacks import PROMPT


def stop_now(*args, **kwargs):
    return True


def generate_trust_remote_code(model, backend):
    with model.generate(PROMPT, max_new_tokens=2, trust_remote_code=True, backend=backend) as tracer:
        out = tracer.result.save()


def generate_custom_generate(model, backend):
    with model.generate(PROMPT, max_new_tokens=2, custom_generate="attacker/loop", backend=backend) as tracer:
        out = tracer.result.save()


def generate_assistant_model(model, backend):
    with model.generate(PROMPT, max_new_tokens=2, assistant_model="attacker/draft", backend=backend) as tracer:
        out = tracer.result.save()


def nested_trust_remote_code(model, backend):
    with model.generate(PROMPT, max_new_tokens=2, generation_kwargs={"trust_remote_code": True},
                        backend=backend) as tracer:
        out = tracer.result.save()


def kernel_hub_attention(model, backend):
    with model.trace(PROMPT, attn_implementation="kernels-community/flash-attn", backend=backend):
        out = model.lm_head.output.save()


def callable_stopping_criteria(model, backend):
    with model.generate(PROMPT, max_new_tokens=2, stopping_criteria=[stop_now], backend=backend) as tracer:
        out = tracer.result.save()


def generation_config_dict(model, backend):
    with model.generate(PROMPT, max_new_tokens=2, generation_config={"max_new_tokens": 1}, backend=backend) as tracer:
        out = tracer.result.save()


ATTACKS = [generate_trust_remote_code, generate_custom_generate, generate_assistant_model, nested_trust_remote_code,
           kernel_hub_attention, callable_stopping_criteria, generation_config_dict]

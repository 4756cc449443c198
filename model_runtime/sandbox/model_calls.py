"""What a request may pass to the model call, and how big a batch it may run.

**Loaders.** The keyword arguments of `model.trace(...)` / `model.generate(...)` reach
transformers' `generate` and the model's `forward`. Some of them load code or weights from
elsewhere (`trust_remote_code`, `custom_generate` fetches a generation loop from the Hub,
`assistant_model`, a kernel-hub `attn_implementation`), carry objects the server would call
(`streamer`, `stopping_criteria`, `logits_processor`), or replace server configuration
(`generation_config`). They are refused by name, at any depth, and every value must be plain data
(numbers, strings, tensors and containers of them), so no object reaches a loader whatever
its key.

**Shapes.** A ModelDeployment's `maxBatchSize` and `maxSequenceLength` size its memory budget: a
larger batch risks a co-tenant's memory. The model carries one pre-hook on its forward, given
when the sandbox first serves it; while a request runs, its thread's forward calls are refused
inputs with more rows or positions than that (generation included: the attention mask grows with
each new token).

**Attention.** The budget is sized for the attention the replica loaded
(`ndif_operator.api.attention`): SDPA never holds a score matrix, eager holds one layer's
batch x heads x seq^2 scores at a time. A request may not switch an SDPA model to eager (nnsight's
client sends its own `attn_implementation`; `check_attention`), and the config it would change is
read-only to requests. `output_attentions=True` (the model's forward keeps every layer's weights)
runs only on an eager model, and only while every layer's weights for the request's batch fit in
the score allowance the budget holds for one layer at the deployment's limits; otherwise the
forward's pre-hook refuses it and says what to do instead.
"""

from __future__ import annotations

import threading
from typing import Any

from model_runtime.sandbox.errors import LimitExceeded, PayloadRejected

LOADER_KWARGS = frozenset(
    {
        "trust_remote_code", "custom_generate", "assistant_model", "assistant_tokenizer", "tokenizer",
        "generation_config", "streamer", "stopping_criteria", "logits_processor", "prefix_allowed_tokens_fn",
        "negative_prompt_ids", "synced_gpus", "revision", "cache_dir", "token", "use_auth_token",
        "local_files_only", "force_download", "quantization_config", "device_map", "load_custom_generate",
        "attn_implementation", "use_kernels", "kernel_config", "past_key_values", "pretrained_model_name_or_path",
    }
)
_PLAIN = (str, int, float, bool, complex, type(None), bytes, slice, range, type(Ellipsis))


EAGER = "eager"


def check_attention(requested: Any, deployed: str) -> None:
    """Refuse a request that would switch a model budgeted for another attention to eager."""
    if requested == EAGER and deployed != EAGER:
        raise LimitExceeded(
            f"this model runs {deployed!r} attention and its memory budget is sized for it; the request asks for "
            "'eager' attention (attn_implementation), which holds a batch x heads x sequence^2 score matrix per "
            "layer that the budget does not count. Load your client model without attn_implementation='eager' "
            "(it then sends the server's); to read attention weights, compute them in the trace from a layer's "
            "queries and keys (e.g. through .source)"
        )


def check_call_kwargs(kwargs: dict[str, Any]) -> None:
    """Refuse loader keywords and anything but plain data in a model call's keyword arguments."""
    _check(kwargs, "", 0)


def _check(value: Any, where: str, depth: int) -> None:
    import torch

    if depth > 20:
        raise PayloadRejected("the model call's arguments are nested too deeply")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise PayloadRejected("the model call's keyword names must be strings")
            if key in LOADER_KWARGS:
                raise PayloadRejected(
                    f"the keyword argument {key!r} is not accepted by this server (it loads code or weights, "
                    "or hands the server an object to call); leave it out"
                )
            _check(item, f"{where}{key}.", depth + 1)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            _check(item, where, depth + 1)
    elif not isinstance(value, (*_PLAIN, torch.Tensor, torch.dtype, torch.Size)):
        name = where.rstrip(".") or "an argument"
        raise PayloadRejected(
            f"the model call's argument {name!r} is a {type(value).__name__}; only plain values "
            "(numbers, strings, tensors, lists and dicts of them) are accepted"
        )


def _check_output_attentions(module: Any, rows: int, positions: int, max_batch_size: int,
                             max_sequence_length: int) -> None:
    """`output_attentions=True` keeps every layer's attention weights: refuse it where the budget
    does not hold them (see the module doc)."""
    config = module.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    implementation = getattr(config, "_attn_implementation", None)
    if implementation != EAGER:
        raise LimitExceeded(
            f"output_attentions=True needs eager attention; this model runs {implementation!r} attention, which "
            "computes no attention weights (they would come back as None), and its memory budget is not sized for "
            "eager attention's batch x heads x sequence^2 score matrices. Leave output_attentions out and compute "
            "the weights you need in the trace from a layer's queries and keys (e.g. through .source)"
        )
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    element = next(module.parameters()).element_size()
    kept = layers * rows * heads * positions * positions * element
    # The budget's eager score matrix: one layer's, at the limits, with its float32 softmax.
    allowance = max_batch_size * heads * max_sequence_length * max_sequence_length * (element + 4)
    if kept > allowance:
        raise LimitExceeded(
            f"output_attentions=True keeps every layer's attention weights, {kept:,} bytes for {rows} prompt(s) of "
            f"{positions} positions; this model's memory budget holds {allowance:,} bytes of attention scores (one "
            "layer's at its maxBatchSize and maxSequenceLength). Use fewer or shorter prompts, or save the "
            "attention weights of the layers you need from their modules' outputs instead"
        )


_ACTIVE = threading.local()  # .limits: the `shape_limits` active on this thread, if any


def _check_active(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """The model's forward pre-hook: the limits of the request running on this thread, if any."""
    limits = getattr(_ACTIVE, "limits", None)
    if limits is not None:
        limits._check(module, args, kwargs)


def install_shape_hook(module: Any) -> None:
    """Give the model its forward pre-hook once (idempotent). Call before the server's state is
    snapshotted (`provenance.ServerState`), so that the hook tables it records hold the hook."""
    if not any(hook is _check_active for hook in module._forward_pre_hooks.values()):
        module.register_forward_pre_hook(_check_active, with_kwargs=True)


class shape_limits:
    """While active, the model's forward on this thread refuses batches or sequences past the
    limits, and `output_attentions=True` where the budget does not hold the weights it keeps.

    The model carries one permanent pre-hook (`install_shape_hook`), which checks the limits active
    on the calling thread: entering sets them (no hook registered and removed per request). A
    class rather than a generator context manager: it is entered on every request."""

    __slots__ = ("_previous", "max_batch_size", "max_sequence_length", "module")

    def __init__(self, module: Any, max_batch_size: int, max_sequence_length: int) -> None:
        self.module = module
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self._previous: shape_limits | None = None

    def __enter__(self) -> None:
        install_shape_hook(self.module)  # (present already once the sandbox knows the model)
        self._previous = getattr(_ACTIVE, "limits", None)
        _ACTIVE.limits = self

    def __exit__(self, *_exc: object) -> None:
        _ACTIVE.limits = self._previous

    def _check(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        import torch

        max_batch_size, max_sequence_length = self.max_batch_size, self.max_sequence_length
        rows = positions = 0
        for name in ("input_ids", "inputs_embeds", "attention_mask"):
            tensor = kwargs.get(name)
            if tensor is None and name == "input_ids" and args:
                tensor = args[0]
            if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2:
                continue
            rows, positions = max(rows, int(tensor.shape[0])), max(positions, int(tensor.shape[1]))
            if rows > max_batch_size:
                raise LimitExceeded(
                    f"the batch has {rows} rows; this model accepts at most {max_batch_size} (its maxBatchSize, "
                    "which sizes its memory budget): split the prompts over several requests"
                )
            if positions > max_sequence_length:
                raise LimitExceeded(
                    f"the sequence has {positions} positions; this model accepts at most {max_sequence_length} "
                    "(its maxSequenceLength, prompt plus generated tokens): shorten the prompt or max_new_tokens"
                )
        if kwargs.get("output_attentions"):
            _check_output_attentions(module, rows, positions, max_batch_size, max_sequence_length)

"""How a checkpoint's bytes split under its model's TP plan (shared by the TP byte-count tests)."""

from __future__ import annotations

import re
from pathlib import Path

import torch


def checkpoint_split(path: Path) -> tuple[int, int]:
    """(bytes of tensors the model's TP plan shards, bytes of the replicated ones) in `path`."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        plan = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).tp_plan
    rules = [(re.compile(re.escape(p).replace(r"\*", r"[^.]+") + r"$"), style) for p, style in plan.items()]
    sharded = replicated = 0
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            piece = f.get_slice(name)
            nbytes = piece[...].numel() * piece[...].element_size()
            module, kind = name.rsplit(".", 1)
            style = next((s for rx, s in rules if rx.match(module)), None)
            split = style is not None and style != "replicated_with_grad_allreduce" and not (
                style.startswith("rowwise") and kind == "bias")
            if split:
                sharded += nbytes
            else:
                replicated += nbytes
    return sharded, replicated

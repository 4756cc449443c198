"""The runtime-side evaluator: sizes a checkpoint by instantiating it on the meta device.

The operator sizes checkpoints from safetensors headers and never imports torch. For the rest
(`pytorch_model.bin`, custom code) it reports `EstimatePending` with a cache key; this module,
which runs where the runtime's stack and the checkpoint are (a Job from the runtime image, or a
replica), builds the model on the meta device (no weights are read or allocated), sums parameter
and buffer bytes in the requested dtype, and prints ONE JSON line: an evaluator cache entry in
the exact format of `ndif_operator.evaluation.CacheEntry.to_json` (the operator parses it with
`CacheEntry.from_json` and stores it in the cache ConfigMap).

    python -m model_runtime.meta_evaluator --key '<cache key>' --dtype bfloat16 /path/to/checkpoint

The checkpoint is a directory, a Hub repo id (`--revision`), or `s3://bucket/prefix` (only its
config.json is fetched). `--termination-log /dev/termination-log` also writes the line there: the
operator runs this as a Kubernetes Job and reads the result from the pod's termination message.

Only `ndif_operator.api` is imported from the operator side (import-linter contract).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ndif_operator.api import DType, EstimateMethod
from ndif_operator.api.attention import attention_of

_ENTRY_VERSION = 2  # = ndif_operator.evaluation.cache._SCHEMA_VERSION; a test keeps them equal


def _shape(config: Any) -> dict[str, Any]:
    """The budget inputs, read through transformers' attribute aliases (n_layer → num_hidden_layers...)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    intermediate = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return {
        "num_layers": int(text.num_hidden_layers),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(text, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(text, "head_dim", None) or hidden // heads),
        "intermediate_size": int(intermediate),
        "vocab_size": int(text.vocab_size),
        "tie_word_embeddings": bool(getattr(text, "tie_word_embeddings", False)),
        "torch_dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "max_positions": int(getattr(text, "max_position_embeddings", None) or 0),
        "model_type": str(getattr(text, "model_type", "") or ""),
        "attention": attention_of(config).value,
    }


def _fetch_s3_config(url: str, target: Path, *, endpoint_url: str | None, region: str | None) -> Path:
    """Download `<url>/config.json` into `target`: the meta device needs nothing else."""
    import boto3

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    key = f"{prefix.strip('/')}/config.json" if prefix.strip("/") else "config.json"
    client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region)
    target.mkdir(parents=True, exist_ok=True)
    client.download_file(bucket, key, str(target / "config.json"))
    return target


def meta_size(checkpoint: str, dtype: DType, *, trust_remote_code: bool = False,
              revision: str | None = None) -> dict[str, Any]:
    """Parameter and buffer bytes of `checkpoint` (a directory or a repo id) on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust_remote_code,
                                        **({"revision": revision} if revision else {}))
    torch_dtype = getattr(config, "dtype", None) if dtype == DType.AUTO else getattr(torch, DType(dtype).value)
    if not isinstance(torch_dtype, torch.dtype):
        torch_dtype = torch.float32
    with torch.device("meta"):
        auto: Any = AutoModelForCausalLM  # untyped classmethods
        model = auto.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    # parameters()/buffers() yield a tied tensor once, which is what the GPU holds.
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    return {
        "weightsBytes": int(weights),
        "parameterCount": int(sum(p.numel() for p in params)),
        "elementSize": int(torch.empty((), dtype=torch_dtype).element_size()),
        "shape": _shape(config),
    }


def cache_entry_json(key: str, checkpoint: str, dtype: DType, *, now: datetime | None = None,
                     trust_remote_code: bool = False, revision: str | None = None) -> str:
    sized = meta_size(checkpoint, dtype, trust_remote_code=trust_remote_code, revision=revision)
    body = {
        "v": _ENTRY_VERSION,
        "key": key,
        "method": EstimateMethod.META_DEVICE.value,
        "evaluatedAt": (now or datetime.now(UTC)).isoformat(),
        **sized,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint directory, or a repo id present in the HF cache")
    parser.add_argument("--key", required=True, help="the cache key the operator reported (EstimatePending)")
    parser.add_argument("--dtype", default=DType.BFLOAT16.value, choices=[d.value for d in DType])
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit (repo id checkpoints)")
    parser.add_argument("--s3-endpoint-url", default=None)
    parser.add_argument("--s3-region", default=None)
    parser.add_argument("--termination-log", default=None,
                        help="also write the JSON line here (a pod's /dev/termination-log)")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="meta-eval-") as scratch:
            checkpoint = args.checkpoint
            if checkpoint.startswith("s3://"):
                checkpoint = str(_fetch_s3_config(checkpoint, Path(scratch), endpoint_url=args.s3_endpoint_url,
                                                  region=args.s3_region))
            revision = args.revision if not Path(checkpoint).is_dir() else None
            line = cache_entry_json(args.key, checkpoint, DType(args.dtype),
                                    trust_remote_code=args.trust_remote_code, revision=revision)
        code = 0
    except Exception as exc:  # report any failure as one line the operator can show in status
        # A termination message holds at most 4096 bytes: keep the error short enough.
        line = json.dumps({"error": f"{type(exc).__name__}: {exc}"[:3000], "key": args.key})
        code = 1
    print(line, file=sys.stdout)
    if args.termination_log:
        with contextlib.suppress(OSError):  # best effort: stdout (FallbackToLogsOnError) carries it too
            Path(args.termination_log).write_text(line + "\n")
    return code


if __name__ == "__main__":
    raise SystemExit(main())

"""Load a model replica's nnsight wrapper from its source, in its dtype, onto its device.

Sources (`ndif_operator.api.ModelSource`): a local directory, the Hugging Face cache/Hub (by repo
id and revision), or an S3 prefix (downloaded with boto3 into a local cache directory first, so
that transformers reads ordinary files).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_runtime import credentials
from model_runtime.settings import RuntimeSettings
from ndif_operator.api import ModelAppArgs
from ndif_operator.api.attention import attention_of


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # nnsight TransformersModel
    source_kind: str  # "localPath" | "huggingFace" | "s3"
    load_seconds: float
    device: str
    checkpoint: str = ""  # what `from_pretrained` read: a local directory, or the repo id (hub cache)


def torch_dtype(name: str) -> Any:
    import torch

    if name == "auto":
        return "auto"
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; use auto, float32, float16 or bfloat16") from None


def pick_device(gpus: float) -> str:
    """The device the replica's grant points at: cuda when Ray granted GPUs, else cpu."""
    import torch

    if gpus > 0 and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def s3_cache_root() -> Path:
    """Where S3 checkpoints are staged; one subdirectory per bucket/prefix."""
    return RuntimeSettings.from_env().s3_cache


def s3_stage(bucket: str, prefix: str, *, endpoint_url: str | None, region: str | None) -> Path:
    """Download every object under `bucket/prefix` into the local cache; return the directory.

    Objects already present with the same size are not downloaded again.
    """
    from model_runtime.replica.parallel.s3_slices import s3_client, s3_objects

    target = s3_cache_root() / bucket / prefix.strip("/")
    client = s3_client(endpoint_url, region)
    found = 0
    for key, rel, size in s3_objects(client, bucket, prefix):
        dest = target / rel
        found += 1
        if dest.exists() and dest.stat().st_size == size:
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(dest))
    if found == 0:
        stripped = prefix.strip("/")
        raise FileNotFoundError(f"no objects under s3://{bucket}/{stripped + '/' if stripped else ''}")
    return target


def resolve_checkpoint(args: ModelAppArgs, *, by_ranges: bool = False) -> tuple[str, str]:
    """(what to hand `from_pretrained`, source kind). `by_ranges`: a tensor-parallel load, whose
    ranks read their slices of an S3 checkpoint by ranged GETs (parallel/s3_slices.py), so only
    the small files are staged."""
    source = args.source
    if source.local_path is not None:
        path = Path(source.local_path.path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"local checkpoint {path} has no config.json")
        return str(path), "localPath"
    if source.s3 is not None:
        s3 = source.s3
        if by_ranges:
            from model_runtime.replica.parallel.s3_slices import stage_s3_index

            return str(stage_s3_index(s3.bucket, s3.prefix, endpoint_url=s3.endpoint_url, region=s3.region)), "s3"
        staged = s3_stage(s3.bucket, s3.prefix, endpoint_url=s3.endpoint_url, region=s3.region)
        return str(staged), "s3"
    return args.repo_id, "huggingFace"


def attention_for(checkpoint: str, *, revision: str | None = None, trust_remote_code: bool = False) -> str:
    """The attention implementation to load `checkpoint` with: the rule the estimator sizes the
    budget for (`ndif_operator.api.attention`), so that what runs is what was budgeted."""
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    return attention_of(AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust_remote_code, **kwargs)).value


def load_model(args: ModelAppArgs) -> LoadedModel:
    """Build the dispatched nnsight wrapper the replica serves."""
    from nnsight import TransformersModel

    started = time.monotonic()
    checkpoint, kind = resolve_checkpoint(args)
    device = pick_device(args.gpus_per_replica)
    kwargs: dict[str, Any] = {
        "task": "text-generation",
        "dispatch": True,
        "dtype": torch_dtype(str(args.dtype)),
        "device_map": device,
        "trust_remote_code": args.trust_remote_code,
    }
    if kind == "huggingFace" and args.revision:
        kwargs["revision"] = args.revision
    with credentials.hub_token_in_environment():  # the config read and the load may reach the Hub
        kwargs["attn_implementation"] = attention_for(checkpoint, revision=kwargs.get("revision"),
                                                      trust_remote_code=args.trust_remote_code)
        model = TransformersModel(checkpoint, **kwargs)
    model._module.requires_grad_(False)
    return LoadedModel(model=model, source_kind=kind, load_seconds=time.monotonic() - started, device=device,
                       checkpoint=checkpoint)

"""The command line of the runtime-side meta-device evaluator for one model. Pure.

The operator runs it as a Kubernetes Job (`ndif_operator.operator.meta_job`), local mode as a
subprocess; both build it here so that the two agree on how a source becomes a checkpoint
argument: a local path as is, S3 as `s3://bucket/prefix` (the evaluator fetches config.json), the
Hub as the repo id (the evaluator reads its config through transformers, `HF_ENDPOINT` for a
mirror).
"""

from __future__ import annotations

from ndif_operator.api import DType, ModelSpec

META_EVALUATOR_MODULE = "model_runtime.meta_evaluator"


def checkpoint_argument(model: ModelSpec) -> str:
    src = model.source
    if src.local_path is not None:
        return src.local_path.path
    if src.s3 is not None:
        return f"s3://{src.s3.bucket}/{src.s3.prefix.strip('/')}"
    return model.repo_id


def meta_evaluator_args(model: ModelSpec, key: str, *, termination_log: str | None = None) -> list[str]:
    """Arguments after `python -m model_runtime.meta_evaluator`."""
    args = ["--key", key, "--dtype", DType(model.dtype).value, "--revision", model.revision]
    if model.source.s3 is not None:
        if model.source.s3.endpoint_url:
            args += ["--s3-endpoint-url", model.source.s3.endpoint_url]
        if model.source.s3.region:
            args += ["--s3-region", model.source.s3.region]
    if model.trust_remote_code:
        args.append("--trust-remote-code")
    if termination_log:
        args += ["--termination-log", termination_log]
    return [*args, checkpoint_argument(model)]

"""A plain nnsight 0.8.1 client script against an NDIF server (here: `ndif-operator local`).

    NDIF_HOST=http://127.0.0.1:8000 python examples/nnsight_client.py \
        --model-dir .demo/tiny-llama --repo-id ndif-demo/tiny-llama

Four experiments, each one `remote=True` request: save a hidden state, patch an activation
(zero one MLP output and see the logits move), generate a few tokens, and the first one again as a
non-blocking job (submit, then poll for the result). `--check-local` loads
the same checkpoint in this process and compares every remote result with a local trace.
`--json PATH` writes the results for scripts and tests.

Nothing here is NDIF-specific except the two lines that keep the client offline: the client
would ask the Hugging Face Hub for the canonical id of `--repo-id`; we tell it instead, and build
the client-side (meta, weightless) model from the config in `--model-dir`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

PROMPT = "The Eiffel Tower is in the city of"


def connect(model_dir: str, repo_id: str) -> Any:
    import nnsight
    from nnsight import TransformersModel
    from nnsight.modeling.huggingface import _ID_CACHE

    _ID_CACHE[model_dir] = repo_id  # what the Hub would answer; the server routes by this id
    nnsight.CONFIG.API.HOST = os.environ.get("NDIF_HOST", "http://127.0.0.1:8000")
    nnsight.CONFIG.API.APIKEY = os.environ.get("NDIF_API_KEY") or None
    nnsight.CONFIG.APP.REMOTE_LOGGING = os.environ.get("NDIF_CLIENT_QUIET") != "1"
    return TransformersModel(model_dir, task="text-generation")  # stays on the meta device


def save_hidden_state(model: Any, remote: bool) -> tuple[Any, Any]:
    with model.trace(PROMPT, remote=remote):
        hidden = model.model.layers[0].output.save()
        logits = model.lm_head.output.save()
        print("hello from inside the trace")  # arrives as a LOG status when remote
    return hidden, logits


def patch_activation(model: Any, remote: bool) -> Any:
    with model.trace(PROMPT, remote=remote):
        model.model.layers[1].mlp.output[:] = 0
        patched = model.lm_head.output.save()
    return patched


def generate(model: Any, remote: bool, tokens: int) -> Any:
    with model.generate(PROMPT, max_new_tokens=tokens, do_sample=False, remote=remote) as tracer:
        output = tracer.result.save()
    return output


def submit_and_poll(model: Any, timeout_s: float = 120.0) -> Any:
    """Non-blocking: the request returns at once; the result is fetched by polling (from the
    server's object store when it has one)."""
    with model.trace(PROMPT, remote=True, blocking=False) as tracer:
        logits = model.lm_head.output.save()  # noqa: F841 (the poll returns saves by name)
    backend = tracer.backend
    deadline = time.monotonic() + timeout_s
    while (result := backend()) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {backend.job_id} did not complete within {timeout_s:.0f}s")
        time.sleep(0.1)
    return result["logits"]


def run(model: Any, remote: bool, tokens: int) -> dict[str, Any]:
    hidden, logits = save_hidden_state(model, remote)
    patched = patch_activation(model, remote)
    output = generate(model, remote, tokens)
    polled = submit_and_poll(model) if remote else logits  # locally there is nothing to poll
    return {"hidden": hidden, "logits": logits, "patched": patched, "generated": output, "polled": polled}


def matches(remote: Any, local: Any) -> bool:
    """Float values to a tolerance: a server on a GPU computes them with other kernels than this
    CPU (on a CPU server they are bit-equal, see `bit_equal_to_local`). Token ids exactly."""
    import torch

    if remote.shape != local.shape:
        return False
    if not remote.is_floating_point():
        return bool(torch.equal(remote, local))
    return bool(torch.allclose(remote, local, rtol=1e-4, atol=1e-5))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="checkpoint dir (config + tokenizer for the client)")
    parser.add_argument("--repo-id", required=True, help="the ModelDeployment's spec.model.repoId")
    parser.add_argument("--tokens", type=int, default=5, help="tokens to generate")
    parser.add_argument("--check-local", action="store_true", help="compare with a local trace")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    args = parser.parse_args(argv)

    import torch

    model_dir = str(Path(args.model_dir).resolve())
    model = connect(model_dir, args.repo_id)
    remote = run(model, True, args.tokens)
    tokenizer = model.tokenizer
    hidden, logits, patched = remote["hidden"], remote["logits"], remote["patched"]
    text = tokenizer.decode(remote["generated"][0])
    shift = (patched - logits).abs().max().item()
    print(f"prompt:                 {PROMPT!r}")
    print(f"layer 0 hidden state:   shape {tuple(hidden.shape)}, mean {hidden.mean().item():+.5f}")
    print(f"logits:                 shape {tuple(logits.shape)}")
    print(f"zeroing layer 1's MLP moved the logits by up to {shift:.4f}")
    print(f"generated:              {text!r}")
    print(f"non-blocking submit + poll gave the same logits: {bool(remote['polled'].equal(logits))}")
    report: dict[str, Any] = {
        "hidden_shape": list(hidden.shape),
        "hidden_mean": hidden.mean().item(),
        "logits_shape": list(logits.shape),
        "patch_shift": shift,
        "generated_ids": remote["generated"][0].tolist(),
        "generated_text": text,
        "polled_equal": bool(remote["polled"].equal(logits)),
    }
    if args.check_local:
        from nnsight import TransformersModel

        local_model = TransformersModel(model_dir, task="text-generation", dispatch=True, device_map="cpu",
                                        dtype=torch.float32)
        local = run(local_model, False, args.tokens)
        same = {name: matches(remote[name], local[name]) for name in remote}
        print(f"equal to a local trace: {same}")
        report["equal_to_local"] = same
        report["bit_equal_to_local"] = {name: bool(torch.equal(remote[name], local[name])) for name in remote}
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`make demo`: a tiny model served by `ndif-operator local`, used by a real nnsight client.

1. builds a tiny Llama (random weights, tokenizer trained in code; no download) in .demo/ unless
   it is already there, and writes a ModelDeployment for it (.demo/tiny-llama.yaml);
2. starts `ndif-operator local .demo/tiny-llama.yaml` (local Ray, the operator's plan, the gateway
   on localhost) and waits until it serves;
3. runs examples/nnsight_client.py against it (save a hidden state, patch an activation, generate
   a few tokens, a non-blocking submit + poll; each compared with a local trace), prints the
   gateway's model table;
4. stops local mode (as Ctrl-C would) and checks that it exited cleanly.

    python examples/demo.py [--port-offset N] [--keep-running]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / ".demo"
REPO_ID = "ndif-demo/tiny-llama"

MANIFEST = """\
# Written by examples/demo.py: the demo's tiny model, served Hot from a local directory.
apiVersion: ndif.dev/v1alpha1
kind: ModelDeployment
metadata:
  name: tiny-llama
  namespace: demo
spec:
  model:
    repoId: {repo_id}
    source:
      localPath:
        path: {path}
    dtype: float32
  level: Hot
  replicas: 1
  limits:
    requestTimeoutSeconds: 60
    maxBatchSize: 1
    maxSequenceLength: 128
"""


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def prepare() -> Path:
    sys.path.insert(0, str(ROOT))
    from model_runtime.tiny_models import ensure_tiny_model

    model_dir = ensure_tiny_model("llama", DEMO / "tiny-llama")
    manifest = DEMO / "tiny-llama.yaml"
    manifest.write_text(MANIFEST.format(repo_id=REPO_ID, path=model_dir.resolve()))
    return manifest


def free_port_offset() -> int:
    """The first port block local mode can use: a busy 8000 or 8265 must not break `make demo`."""
    from ndif_operator.local.ray_head import RayPorts, busy_ports

    for offset in range(0, RayPorts.MAX_OFFSET + 1, 100):
        if not busy_ports(RayPorts.offset(offset)):
            return offset
    raise SystemExit("no free block of ports for local mode; pass --port-offset")


def wait_ready(proc: subprocess.Popen[bytes], ready_file: Path, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ndif-operator local exited with {proc.returncode} before serving")
        if ready_file.exists():
            info: dict[str, str] = json.loads(ready_file.read_text())
            return info
        time.sleep(0.5)
    raise SystemExit(f"ndif-operator local did not serve within {timeout:.0f}s")


def status_table(ndif_host: str) -> str:
    with urllib.request.urlopen(f"{ndif_host}/status", timeout=30) as response:
        deployments = json.loads(response.read())["deployments"]
    lines = [f"{'APPLICATION':<28} {'REPO ID':<24} {'LEVEL':<6} {'STATE':<10} QUEUE"]
    for app, d in sorted(deployments.items()):
        lines.append(
            f"{app:<28} {d['repo_id']:<24} {d['deployment_level']:<6} {d['application_state']:<10} "
            f"{d.get('queue_depth', 0)}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--port-offset", type=int, default=None,
        help="shift local mode's ports (default: the first free block of 0, 100, 200, ...)",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--keep-running", action="store_true", help="leave it serving until Ctrl-C")
    args = parser.parse_args(argv)

    offset = args.port_offset if args.port_offset is not None else free_port_offset()
    step(f"building the tiny model in {DEMO / 'tiny-llama'} (skipped when present)")
    DEMO.mkdir(exist_ok=True)
    manifest = prepare()
    print(f"wrote {manifest.relative_to(ROOT)}")

    step("starting `ndif-operator local` (local Ray, the operator's plan, the gateway on localhost)")
    ready_file = DEMO / "ready.json"
    ready_file.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    local = subprocess.Popen(
        [sys.executable, "-m", "ndif_operator.cli", "local", str(manifest), "--ready-file", str(ready_file),
         "--port-offset", str(offset), "--timeout", str(args.timeout)],
        cwd=ROOT, env=env,
    )  # fmt: skip
    code = 1
    try:
        info = wait_ready(local, ready_file, args.timeout + 120)
        step(f"running examples/nnsight_client.py with NDIF_HOST={info['ndif_host']}")
        print("(the tiny model has random weights: its generated text is noise; the point is that every\n"
              " remote result equals a local trace of the same checkpoint)")
        client = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "nnsight_client.py"), "--model-dir", str(DEMO / "tiny-llama"),
             "--repo-id", REPO_ID, "--check-local"],
            cwd=ROOT, env={**env, "NDIF_HOST": info["ndif_host"]}, check=False,
        )  # fmt: skip
        step("the gateway's model table (GET /status)")
        print(status_table(info["ndif_host"]))
        code = client.returncode
        if args.keep_running and code == 0:
            step("serving; press Ctrl-C to stop")
            local.wait()
    except KeyboardInterrupt:
        code = 130
    finally:
        step("stopping local mode")
        if local.poll() is None:
            local.send_signal(signal.SIGINT)  # what Ctrl-C does in a terminal
            try:
                local.wait(timeout=90)
            except subprocess.TimeoutExpired:
                local.kill()
                local.wait()
        print(f"ndif-operator local exited with {local.returncode}")
    if code == 0 and local.returncode != 0:
        code = local.returncode
    step("demo " + ("finished" if code == 0 else f"FAILED (exit {code})"))
    return code


if __name__ == "__main__":
    raise SystemExit(main())

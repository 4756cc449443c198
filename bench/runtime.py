"""Runtime benchmark: what a remote nnsight trace costs, how it scales, and cold vs warm activation.

Same tiny model (tiny Llama, float32), same prompt, same intervention (save the logits) throughout:

1. plain forward (HF model, no nnsight)          ┐ baselines, in this process
2. local nnsight trace                           ┘
3. remote round trip: the unmodified nnsight client → `ndif-operator local` (gateway + model app),
   with two parts of it measured apart: the replica's execution time (`meta.runtime`) and what the
   client spends building a new `httpx.Client` (an SSL context) for every request
4. throughput: 8 concurrent client processes vs 1 client process (same requests each), and the
   server's capacity without client cost: the same request pre-serialized once and sent by 1 vs 8
   concurrent websocket sessions from one asyncio process
5. activation, measured as "config PUT → first successful remote trace":
   cold (the model's Serve app is created: replica start, imports, load from disk) vs
   warm (the app exists with the weights in CPU RAM; `user_config.level` flips to Hot).

    python bench/runtime.py [--requests 40] [--clients 8] [--per-client 10] [--port-offset 400]

Ratios are printed against the baselines; the last line is the headline figure.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

PROMPT = "The Eiffel Tower is in the city of"
REPO_ID = "ndif-bench/tiny-llama"
MANIFEST = """\
apiVersion: ndif.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: tiny, namespace: bench}}
spec:
  model: {{repoId: {repo}, source: {{localPath: {{path: {path}}}}}, dtype: float32}}
  limits: {{maxBatchSize: 1, maxSequenceLength: 128, maxQueueDepth: 256}}
"""


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def median_time(fn: Any, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def gc_cost(repeats: int) -> tuple[float, float]:
    """The per-request collection in this process (torch, transformers, nnsight and a model loaded,
    like a replica): the former full `gc.collect()` vs `collect_request_garbage()` once the
    long-lived objects are frozen (what a replica now does after a load or level move)."""
    from model_runtime.garbage import collect_request_garbage, freeze_long_lived, release_frozen

    full_s = median_time(gc.collect, repeats, warmup=1)
    freeze_long_lived()
    try:
        cheap_s = median_time(collect_request_garbage, repeats, warmup=1)
    finally:
        release_frozen()
    return full_s, cheap_s


def connect_client(model_dir: str, url: str) -> Any:
    import nnsight
    from nnsight import TransformersModel
    from nnsight.modeling.huggingface import _ID_CACHE

    _ID_CACHE[model_dir] = REPO_ID
    nnsight.CONFIG.API.HOST = url
    nnsight.CONFIG.APP.REMOTE_LOGGING = False
    return TransformersModel(model_dir, task="text-generation")


def trace_logits(model: Any, remote: bool) -> Any:
    with model.trace(PROMPT, remote=remote):
        logits = model.lm_head.output.save()
    return logits


def server_runtime(model: Any) -> float:
    """The replica's own execution time of one remote trace (`meta.runtime`, reported by the server)."""
    with model.trace(PROMPT, remote=True) as tracer:
        model.lm_head.output.save()
    return float((tracer.backend.meta or {}).get("runtime", float("nan")))


# --- worker process (throughput) --------------------------------------------------------------


def worker(model_dir: str, url: str, count: int) -> int:
    """Warm up, report ready, wait for `go` on stdin, run `count` traces, print timings as JSON."""
    model = connect_client(model_dir, url)
    trace_logits(model, True)
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.time()
    latencies = []
    for _ in range(count):
        t0 = time.perf_counter()
        trace_logits(model, True)
        latencies.append(time.perf_counter() - t0)
    print(json.dumps({"start": started, "end": time.time(), "latencies": latencies}), flush=True)
    return 0


def throughput(model_dir: str, url: str, clients: int, per_client: int) -> tuple[float, float]:
    """Requests per second over the common window of `clients` processes, and their median latency."""
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", "--model-dir", model_dir, "--url", url,
             "--per-client", str(per_client)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        for _ in range(clients)
    ]
    try:
        for proc in procs:  # imports and a warm-up request happen before the clock starts
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a benchmark client failed to start")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            assert proc.stdout is not None
            results.append(json.loads(proc.stdout.readline()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.wait(timeout=120)
    window = max(r["end"] for r in results) - min(r["start"] for r in results)
    latencies = [lat for r in results for lat in r["latencies"]]
    return clients * per_client / window, statistics.median(latencies)


# --- server capacity (no per-request client cost) ---------------------------------------------


def capture_request(model: Any) -> tuple[dict[str, Any], bytes]:
    """The envelope and payload the nnsight client would send for `trace_logits` (nothing is sent)."""
    from nnsight.intervention.backends import remote as remote_backend

    captured: dict[str, Any] = {}
    original = remote_backend.RemoteBackend.request

    def grab(self: Any, request: Any, tracer: Any) -> None:
        captured["envelope"] = json.loads(request.metadata())
        captured["blob"] = self._serialize(tracer)
        raise InterruptedError("captured")

    remote_backend.RemoteBackend.request = grab  # type: ignore[method-assign]
    try:
        trace_logits(model, True)
    except Exception:
        if "blob" not in captured:
            raise
    finally:
        remote_backend.RemoteBackend.request = original  # type: ignore[method-assign]
    return captured["envelope"], captured["blob"]


async def _raw_client(url: str, envelope: dict[str, Any], blob: bytes, count: int, http: Any) -> list[float]:
    """One virtual client: its own websocket session, `count` blocking requests one after another."""
    from importlib.metadata import version

    import websockets

    headers = {"nnsight-version": version("nnsight")}
    latencies = []
    async with websockets.connect(url.replace("http", "ws", 1) + "/subscribe") as ws:
        session = json.loads(await ws.recv())["session_id"]
        data = json.dumps({**envelope, "session_id": session})
        for _ in range(count):
            started = time.perf_counter()
            response = await http.post(f"{url}/request", data={"data": data}, headers=headers,
                                       files={"blob": ("request", blob, "application/octet-stream")})
            response.raise_for_status()
            while True:
                frame = await ws.recv()
                if isinstance(frame, bytes):
                    break  # the inline COMPLETED frame is the only binary one
                status = json.loads(frame)["status"]
                if status == "COMPLETED":
                    break
                if status == "ERROR":
                    raise RuntimeError(frame)
            latencies.append(time.perf_counter() - started)
    return latencies


def server_capacity(url: str, envelope: dict[str, Any], blob: bytes, clients: int, per_client: int) -> float:
    """Requests per second the server sustains for `clients` concurrent sessions (one process, asyncio)."""
    import asyncio

    import httpx

    async def run() -> float:
        async with httpx.AsyncClient(timeout=120) as http:
            started = time.perf_counter()
            await asyncio.gather(*(_raw_client(url, envelope, blob, per_client, http) for _ in range(clients)))
            return clients * per_client / (time.perf_counter() - started)

    return asyncio.run(run())


# --- activation -------------------------------------------------------------------------------


def first_trace_after(model: Any, deadline_s: float = 300.0) -> float:
    """Seconds until a remote trace succeeds (the gateway answers 503 while the model is not HOT)."""
    started = time.perf_counter()
    while True:
        try:
            trace_logits(model, True)
            return time.perf_counter() - started
        except Exception:
            if time.perf_counter() - started > deadline_s:
                raise
            time.sleep(0.05)


def with_level(config: dict[str, Any], app: str, level: str | None) -> dict[str, Any]:
    """`config` with the model app at `level`, or without it (None: COLD) — the gateway unchanged."""
    out = copy.deepcopy(config)
    if level is None:
        out["applications"] = [a for a in out["applications"] if a["name"] != app]
        return out
    for application in out["applications"]:
        if application["name"] == app:
            application["deployments"][0]["user_config"]["level"] = level
    return out


def wait_level(url: str, app: str, level: str, timeout: float = 120.0) -> None:
    """Poll the gateway's /status until `app` reports `level` (HOT/WARM)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{url}/status", timeout=30) as response:
            deployments = json.loads(response.read())["deployments"]
        if deployments.get(app, {}).get("deployment_level") == level:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{app} did not become {level} within {timeout:.0f}s")


def activation(mode: Any, model: Any, app: str, rounds: int) -> tuple[float, float]:
    hot = mode.plan.config
    rest = mode.rest
    cold_times, warm_times = [], []
    for _ in range(rounds):
        rest.apply(with_level(hot, app, None))
        rest.wait_running({"gateway"}, timeout=120)
        while app in rest.details().get("applications", {}):
            time.sleep(0.2)  # the old replica must be gone, or "cold" would reuse it
        started = time.perf_counter()
        rest.apply(hot)
        cold_times.append(time.perf_counter() - started + first_trace_after(model))

        rest.apply(with_level(hot, app, "Warm"))
        wait_level(mode.ndif_host, app, "WARM")  # reconfigure is applied in place, not instantly
        started = time.perf_counter()
        rest.apply(hot)
        warm_times.append(time.perf_counter() - started + first_trace_after(model))
    return statistics.median(cold_times), statistics.median(warm_times)


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40, help="timed requests per latency figure")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="cold/warm activation rounds")
    parser.add_argument("--port-offset", type=int, default=400)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.model_dir, args.url, args.per_client)

    import httpx
    import torch
    from nnsight import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model_runtime.tiny_models import build_tiny_model
    from ndif_operator.api.naming import model_app_name
    from ndif_operator.local import LocalMode, LocalSettings, RayPorts

    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="ndif-bench-"))
    model_dir = str(build_tiny_model("llama", workdir / "tiny-llama"))
    (workdir / "bench.yaml").write_text(MANIFEST.format(repo=REPO_ID, path=model_dir))

    print("machine: 2-core x86_64 CPU, no GPU (shared); tiny Llama float32; prompt of "
          f"{len(AutoTokenizer.from_pretrained(model_dir)(PROMPT)['input_ids'])} tokens")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = AutoTokenizer.from_pretrained(model_dir)(PROMPT, return_tensors="pt")

    def plain() -> None:
        with torch.no_grad():
            hf(**inputs)

    plain_s = median_time(plain, args.requests * 5)
    local_model = TransformersModel(model_dir, task="text-generation", dispatch=True, device_map="cpu",
                                    dtype=torch.float32)
    local_s = median_time(lambda: trace_logits(local_model, False), args.requests * 5)
    print(f"plain forward:        median {ms(plain_s)}")
    print(f"local nnsight trace:  median {ms(local_s)}  ({local_s / plain_s:.1f}x plain forward)")
    gc_full_s, gc_cheap_s = gc_cost(15)
    print(f"per-request gc in this process: full gc.collect() {ms(gc_full_s)} vs collect_request_garbage() "
          f"after gc.freeze() {gc_cheap_s * 1e6:.0f} us ({gc_full_s / max(gc_cheap_s, 1e-6):.0f}x cheaper)")

    settings = LocalSettings(manifests=(workdir / "bench.yaml",), ports=RayPorts.offset(args.port_offset),
                             num_cpus=2, deploy_timeout_s=600)
    with LocalMode(settings, log=lambda m: print(f"  [local] {m}", flush=True)) as mode:
        url = mode.ndif_host
        client = connect_client(model_dir, url)
        remote_logits = trace_logits(client, True)
        assert torch.equal(remote_logits, trace_logits(local_model, False)), "remote result differs"
        remote_s = median_time(lambda: trace_logits(client, True), args.requests)
        print(f"remote round trip:    median {ms(remote_s)}  ({remote_s / local_s:.1f}x local trace, "
              f"{remote_s / plain_s:.1f}x plain forward)")
        server_s = statistics.median(server_runtime(client) for _ in range(args.requests))
        print(f"  of which the model replica's execution (meta.runtime): median {ms(server_s)} "
              f"({server_s / remote_s:.0%} of the round trip)")
        httpx_s = median_time(lambda: httpx.Client().close(), args.requests)
        print(f"  of which the client's own httpx.Client() per request (an SSL context): median {ms(httpx_s)} "
              f"({httpx_s / remote_s:.0%} of the round trip)")

        one_rps, one_lat = throughput(model_dir, url, 1, args.per_client)
        many_rps, many_lat = throughput(model_dir, url, args.clients, args.per_client)
        print(f"throughput, 1 client:   {one_rps:.1f} req/s (median latency {ms(one_lat)})")
        print(f"throughput, {args.clients} clients:  {many_rps:.1f} req/s (median latency {ms(many_lat)}); "
              f"{many_rps / one_rps:.2f}x one client")

        envelope, blob = capture_request(client)
        server_capacity(url, envelope, blob, 1, 3)  # warm-up
        raw_one = server_capacity(url, envelope, blob, 1, args.per_client * 2)
        raw_many = server_capacity(url, envelope, blob, args.clients, args.per_client)
        print(f"server capacity (pre-serialized requests, one asyncio process): 1 session {raw_one:.1f} req/s, "
              f"{args.clients} sessions {raw_many:.1f} req/s; {raw_many / raw_one:.2f}x")

        app = model_app_name("bench", "tiny")
        cold_s, warm_s = activation(mode, client, app, args.rounds)
        print(f"activation to first trace: cold {cold_s:.2f} s (new replica, load from disk), "
              f"warm {warm_s:.2f} s (weights in RAM); cold/warm = {cold_s / warm_s:.1f}x")

    print(f"headline: remote round trip {remote_s / local_s:.1f}x a local nnsight trace "
          f"({ms(remote_s)} vs {ms(local_s)}); {args.clients}-client throughput {many_rps / one_rps:.2f}x "
          f"one client ({raw_many / raw_one:.2f}x for pre-serialized sessions); "
          f"warm activation {cold_s / warm_s:.1f}x faster than cold; "
          f"per-request gc {ms(gc_full_s)} -> {gc_cheap_s * 1e6:.0f} us after the freeze")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

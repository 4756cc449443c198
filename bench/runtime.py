"""Runtime benchmark: activation through the operator's rendered change, and the request path.

Everything goes through `ndif-operator local`'s own code: the config is re-planned and rendered by
the operator's pipeline (`local.pipeline.plan_local`, what local mode's activation and the
operator run) and PUT to Serve's REST API (what KubeRay does). Two models built offline:

* **activation** (a Llama of ≥ 500 MB of float32 weights): per round, interleaved,
  COLD → HOT (the application appears; the replica loads from disk and fills the node's weight
  store), HOT → WARM and WARM → HOT (the rendered change; where it only touches what Serve applies
  in place, the replica process is kept and copies the weights from the node's store, otherwise a
  new replica maps them). Each is "config PUT → first successful remote trace". The warm time is
  split with the replica's own marks (PUT → reconfigure → copy done, or, for a replaced replica,
  process start, imports, skeleton and mapping, the copy) and set against the host → device copy
  of the same weights measured in this process in the same round (on a CPU-only box: a clone,
  i.e. a memcpy, into new memory as the replica's copy is; the clone into reused memory is shown too).
* **request path** (a tiny Llama, float32): per iteration, interleaved, a plain HF forward, a
  local nnsight trace and a remote round trip with the unmodified nnsight client. The client's own
  per-request costs, timed inside the client once the trace is captured, are its named steps
  (serialising the trace, building an `httpx.Client`, parsing and loading the result) by wall
  time plus the CPU time of the rest of its thread's work (the websocket and HTTP libraries'
  handshake, encoding, parsing and closing; waits on the network are not CPU time and stay on the
  server's side); the server's steps come from the gateway's `GET /timings`.
  Server-side overhead = round trip - client's own costs - local trace time. The gateway reaches
  the model replica over its direct channel (docs/runtime.md) unless NDIF_DIRECT_CHANNEL=0 is set
  for this run (then through Serve's handle); the breakdown names the path the timed jobs took
  ("channel hop" or "handle hop"). Each iteration takes
  both doors of the rendered config: the gateway replica's own listener (`direct_port`, what local
  mode and the chart hand to clients: the headline) and Serve's proxy in front of the same gateway.

    python bench/runtime.py [--iterations 40] [--rounds 2] [--layers 10] [--port-offset 400]

The last line is the headline: `cold/warm activation X.Xx` and `server-side overhead Y.Y ms`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

PROMPT = "The Eiffel Tower is in the city of"
DOOR, PROXY = "the gateway's direct port", "Serve's proxy"
TINY, BIG = "bench/tiny", "bench/big"
MANIFEST = """\
apiVersion: ndif.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: tiny, namespace: bench}}
spec:
  model: {{repoId: ndif-bench/tiny-llama, source: {{localPath: {{path: {tiny}}}}}, dtype: float32}}
  limits: {{maxBatchSize: 1, maxSequenceLength: 128, maxQueueDepth: 256}}
---
apiVersion: ndif.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: big, namespace: bench}}
spec:
  model: {{repoId: ndif-bench/big-llama, source: {{localPath: {{path: {big}}}}}, dtype: float32}}
  level: Warm
  activateOnRequest: true
"""


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"machine: {os.cpu_count()} cores ({cpu}), no GPU; load average {load:.1f} at start"


# --- the client side ----------------------------------------------------------------------------


def connect_client(model_dir: str, repo_id: str, url: str) -> Any:
    import nnsight
    from nnsight import TransformersModel
    from nnsight.modeling.huggingface import _ID_CACHE

    _ID_CACHE[model_dir] = repo_id  # what the Hub would answer; the gateway routes by it
    nnsight.CONFIG.API.HOST = url
    nnsight.CONFIG.APP.REMOTE_LOGGING = False
    return TransformersModel(model_dir, task="text-generation")


def trace_logits(model: Any, remote: bool) -> Any:
    with model.trace(PROMPT, remote=remote):
        logits = model.lm_head.output.save()
    return logits


class ClientProbe:
    """Times the nnsight client's own per-request work and marks when its steps happen.

    Wraps, in this process only: `RemoteBackend.__call__` (everything the client does once the trace
    is captured: the client is synchronous, so the CPU time its thread spends there is its own
    work, and the waits on the network are not CPU time),
    `RemoteBackend._serialize`, `httpx.Client.__init__` (a new client, i.e. an SSL context, per
    request), `RemoteBackend._post`, `RemoteBackend.parse` and `.finalize`, and
    `websocket.create_connection`.
    """

    def __init__(self) -> None:
        import httpx
        import websocket
        from nnsight.intervention.backends import remote

        self.marks: dict[str, float] = {}
        self.costs: dict[str, float] = {}  # wall time per named step, and "cpu": the whole call's CPU
        self.cpu: dict[str, float] = {}  # CPU time per named step
        backend = remote.RemoteBackend

        def timed(name: str, fn: Callable[..., Any], mark_end: str | None = None) -> Callable[..., Any]:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                started, started_cpu = time.perf_counter(), time.thread_time()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.costs[name] = self.costs.get(name, 0.0) + time.perf_counter() - started
                    self.cpu[name] = self.cpu.get(name, 0.0) + time.thread_time() - started_cpu
                    if mark_end:
                        self.marks[mark_end] = time.time()
            return wrapper

        original_call = backend.__call__

        def call(this: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return original_call(this, *args, **kwargs)
            finally:
                self.costs["cpu"] = self.costs.get("cpu", 0.0) + time.thread_time() - started

        original_post = backend._post

        def post(this: Any, request: Any, blob: bytes) -> Any:
            self.marks["post_start"] = time.time()
            response = original_post(this, request, blob)
            self.marks["post_end"] = time.time()
            self.job_id = response.id
            return response

        original_parse = backend.parse

        def parse(message: Any) -> Any:
            started, started_cpu = time.perf_counter(), time.thread_time()
            response = original_parse(message)
            self.costs["parse"] = self.costs.get("parse", 0.0) + time.perf_counter() - started
            self.cpu["parse"] = self.cpu.get("parse", 0.0) + time.thread_time() - started_cpu
            if str(getattr(response.status, "value", response.status)).upper() == "COMPLETED":
                self.marks["completed_frame"] = time.time() - (time.perf_counter() - started)
            return response

        backend.__call__ = call
        backend._serialize = timed("serialize", backend._serialize)  # type: ignore[method-assign]
        backend._post = post  # type: ignore[method-assign]
        backend.parse = staticmethod(parse)  # type: ignore[method-assign,assignment]
        backend.finalize = timed("finalize", backend.finalize)  # type: ignore[method-assign]
        httpx.Client.__init__ = timed("httpx_client", httpx.Client.__init__)  # type: ignore[method-assign]
        websocket.create_connection = timed("ws_connect", websocket.create_connection, "ws_open")
        self.job_id = ""

    def reset(self) -> None:
        self.marks, self.costs, self.cpu, self.job_id = {}, {}, {}, ""

    def own_costs(self) -> float:
        """The client's own work per request: its named steps by their wall time (as `named_costs`),
        plus the CPU time of everything else its thread does from the captured trace to the values
        back in the caller's frame (the websocket and HTTP libraries' own work: handshake, request
        encoding, response parsing, frame decoding, closing). Waits on the network are not CPU
        time, so they stay on the server's side; CPU time is used for the rest because it is not
        inflated by other processes taking the core on a loaded machine."""
        rest = self.costs.get("cpu", 0.0) - sum(self.cpu.get(k, 0.0) for k in NAMED_STEPS)
        return self.named_costs() + max(rest, 0.0)

    def named_costs(self) -> float:
        """The wall time of the client's named steps only (serialise, `httpx.Client()`, parse, load
        the result): the narrower measure, shown beside the headline's."""
        return sum(self.costs.get(k, 0.0) for k in NAMED_STEPS)


NAMED_STEPS = ("serialize", "httpx_client", "parse", "finalize")


def gateway_timings(url: str) -> dict[str, dict[str, Any]]:
    """The gateway's recent jobs: epoch-second marks per step and `via` (the path to the replica)."""
    with urllib.request.urlopen(f"{url}/timings", timeout=30) as response:
        return dict(json.loads(response.read())["jobs"])


def wait_for_channel(client: Any, url: str, timeout: float = 30.0) -> str:
    """Trace until the gateway's latest job took the direct channel (learned in the background after
    an app's first requests); the path the last job took. With NDIF_DIRECT_CHANNEL=0: "serve" at once."""
    import nnsight

    nnsight.CONFIG.API.HOST = url
    deadline = time.monotonic() + timeout
    via = ""
    while True:
        trace_logits(client, True)
        jobs = gateway_timings(url)
        via = str(list(jobs.values())[-1].get("via", "serve")) if jobs else "serve"
        if via == "channel" or os.environ.get("NDIF_DIRECT_CHANNEL", "1").strip() == "0" or \
                time.monotonic() > deadline:
            return via
        time.sleep(0.2)


SERVER_PROCESSES = {"gateway": b"ServeReplica:gateway:", "model replica": b"ServeReplica:md-bench-tiny:",
                    "Serve's proxy": b"ProxyActor"}


def server_processes(temp_dir: Path) -> dict[str, int]:
    """The pids of the gateway replica, the tiny model's replica and Serve's proxy of the local head
    started with `temp_dir` (Linux /proc; empty elsewhere)."""
    from ndif_operator.local.ray_head import processes_of

    found: dict[str, int] = {}
    try:
        pids = processes_of(temp_dir)
    except OSError:
        return found
    for pid in pids:
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        for name, marker in SERVER_PROCESSES.items():
            if marker in title:
                found[name] = pid
    return found


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU time of each process so far (/proc/<pid>/stat)."""
    out: dict[str, float] = {}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


# --- request path -------------------------------------------------------------------------------


def request_path(urls: dict[str, str], model_dir: str, iterations: int,
                 processes: dict[str, int] | None = None) -> dict[str, dict[str, float]]:
    """Plain forward, local trace, and a remote round trip through each ingress in `urls` (label →
    gateway URL): interleaved per iteration. Medians per ingress (`plain`/`local` repeated in each);
    with `processes` (name → pid), also each server process's CPU time per remote request over the
    timed iterations (`cpu <name>`: averaged over both ingresses' requests, background work included)."""
    import nnsight
    import torch
    from nnsight import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = AutoTokenizer.from_pretrained(model_dir)(PROMPT, return_tensors="pt")
    local = TransformersModel(model_dir, task="text-generation", dispatch=True, device_map="cpu",
                              dtype=torch.float32)
    client = connect_client(model_dir, "ndif-bench/tiny-llama", next(iter(urls.values())))
    probe = ClientProbe()
    for url in urls.values():
        nnsight.CONFIG.API.HOST = url
        assert torch.equal(trace_logits(client, True), trace_logits(local, False)), f"remote result differs ({url})"

    def plain() -> None:
        with torch.no_grad():
            hf(**inputs)

    for _ in range(3):  # warm-up of all
        plain()
        trace_logits(local, False)
        for url in urls.values():
            nnsight.CONFIG.API.HOST = url
            trace_logits(client, True)
    wait_for_channel(client, next(iter(urls.values())))
    rows: dict[str, list[dict[str, float]]] = {label: [] for label in urls}
    cpu_before = cpu_seconds(processes or {})
    for _ in range(iterations):
        started = time.perf_counter()
        plain()
        plain_s = time.perf_counter() - started
        started = time.perf_counter()
        trace_logits(local, False)
        local_s = time.perf_counter() - started
        for label, url in urls.items():
            nnsight.CONFIG.API.HOST = url
            row: dict[str, float] = {"plain": plain_s, "local": local_s}
            probe.reset()
            started = time.perf_counter()
            trace_logits(client, True)
            row["remote"] = time.perf_counter() - started
            row["_done"] = time.time()
            row["client_own"] = probe.own_costs()
            row["client_named"] = probe.named_costs()
            row.update({f"c_{k}": v for k, v in probe.costs.items()})
            row["overhead"] = row["remote"] - row["client_own"] - row["local"]
            row["overhead_named"] = row["remote"] - row["client_named"] - row["local"]
            row.update({f"m_{k}": v for k, v in probe.marks.items()})
            row["_job"] = probe.job_id  # type: ignore[assignment]
            rows[label].append(row)
    cpu_after = cpu_seconds(processes or {})
    out_gc = gc_cost(15)
    server = gateway_timings(next(iter(urls.values())))  # one gateway replica, whichever door
    results = {label: _path_medians(label_rows, server) for label, label_rows in rows.items()}
    remote_requests = max(iterations * len(urls), 1)
    for out in results.values():
        out["gc full"], out["gc request"] = out_gc
        out.update({f"cpu {name}": (cpu_after[name] - cpu_before[name]) / remote_requests
                    for name in cpu_after if name in cpu_before})
    return results


HOPS = {"channel": "channel hop: gateway → replica execute()", "serve": "handle hop: gateway → replica execute()"}


def _path_medians(rows: list[dict[str, float]], server: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Medians of the round trip, the client's own costs and the server-side steps (`/timings`);
    `via <path>`: how many of the timed jobs reached the replica by each path."""
    steps: dict[str, list[float]] = {}
    vias: dict[str, int] = {}

    def add(name: str, value: float) -> None:
        steps.setdefault(name, []).append(value)

    for row in rows:
        s = server.get(str(row["_job"]))
        if s is None or not {"m_post_start", "m_ws_open", "m_completed_frame"} <= set(row):
            continue
        add("websocket open (client connect → session id)", row.get("c_ws_connect", 0.0)
            + row["m_post_start"] - row["m_ws_open"])
        add("POST in: client send → gateway handler",
            s["received"] - row["m_post_start"] - row.get("c_httpx_client", 0.0))
        if "body" in s:
            add("gateway: read the body", s["body"] - s["received"])
            add("gateway: multipart parse", s["form"] - s["body"])
            add("gateway: routing, job record", s["parsed"] - s["form"])
        else:
            add("gateway: auth, multipart parse, routing", s["parsed"] - s["received"])
        via = str(s.get("via") or "serve")
        vias[via] = vias.get(via, 0) + 1
        add(HOPS.get(via, f"{via} hop: gateway → replica execute()"), s["replica_entered"] - s["parsed"])
        add("replica admission → QUEUED back at the gateway", s["admitted"] - s["replica_entered"])
        add("POST out: RECEIVED → client", row["m_post_end"] - s["admitted"])
        add("queue: replica lock wait", s["replica_admitted"] - s["replica_entered"])
        add("execution: deserialise, sandbox, trace, serialise", s["replica_done"] - s["replica_admitted"])
        if {"replica_started", "replica_ran", "replica_encoded", "replica_collected"} <= set(s):
            add("  … lock held → request thread starts", s["replica_started"] - s["replica_admitted"])
            add("  … the runner: deserialise, sandbox, trace", s["replica_ran"] - s["replica_started"])
            add("  … torch.save of the saves", s["replica_encoded"] - s["replica_ran"])
            add("  … back from the request thread, young-gen gc", s["replica_collected"] - s["replica_encoded"])
            add("  … result event, metrics, websocket frame", s["replica_done"] - s["replica_collected"])
        add("result hop: replica → gateway", s["completed"] - s["replica_done"])
        add("result delivery: gateway → client websocket frame", row["m_completed_frame"] - s["completed"])
        add("client after the frame (parse, load, close)", row["_done"] - row["m_completed_frame"])
    out = {k: med([r[k] for r in rows])
           for k in ("plain", "local", "remote", "client_own", "overhead", "client_named", "overhead_named")}
    out.update({f"client {k}": med([r.get(f"c_{k}", 0.0) for r in rows])
                for k in ("serialize", "httpx_client", "parse", "finalize")})
    out.update({f"step {k}": med(v) for k, v in steps.items()})
    out.update({f"via {k}": float(v) for k, v in vias.items()})
    return out


def gc_cost(repeats: int) -> tuple[float, float]:
    """Per-request collection in this process (torch, transformers, nnsight and models loaded, like a
    replica): a full `gc.collect()` vs the replica's `collect_request_garbage()` after `gc.freeze()`."""
    import gc

    from model_runtime.replica.garbage import collect_request_garbage, freeze_long_lived, release_frozen

    def timed(fn: Callable[[], Any]) -> float:
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - started)
        return med(samples)

    full = timed(gc.collect)
    freeze_long_lived()
    try:
        cheap = timed(collect_request_garbage)
    finally:
        release_frozen()
    return full, cheap


# --- activation ---------------------------------------------------------------------------------


def replanned(mode: Any, *, big_level: str | None, activated: bool) -> dict[str, Any]:
    """The config the operator's pipeline renders with the big model at its spec level (or another),
    activated on request or not: what local mode's activation PUTs."""
    from ndif_operator.api import Level
    from ndif_operator.local.manifests import deployment_key
    from ndif_operator.local.pipeline import plan_local

    deployments = []
    for md in mode.deployments:
        if deployment_key(md) == BIG and big_level is not None:
            md = md.model_copy(update={"spec": md.spec.model_copy(update={"level": Level(big_level)})})
        deployments.append(md)
    plan = plan_local(deployments, mode.local, serve_port=mode.settings.ports.serve_http,
                      gateway=mode.settings.gateway_args(), cache=mode.cache,
                      activated=frozenset({BIG}) if activated else frozenset())
    return dict(plan.config)


def big_status(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/status", timeout=60) as response:
        deployments = json.loads(response.read())["deployments"]
    return next((d for d in deployments.values() if d.get("deployment") == BIG), {})


def first_trace_after(model: Any, deadline_s: float = 600.0) -> float:
    """perf_counter time at which a remote trace first succeeds (503s until the model is HOT)."""
    started = time.perf_counter()
    while True:
        try:
            trace_logits(model, True)
            return time.perf_counter()
        except Exception:
            if time.perf_counter() - started > deadline_s:
                raise
            time.sleep(0.05)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """perf_counter time at which `predicate` first holds. A connection error while asking counts
    as "not yet" (the gateway's listener may be moving to a replacement replica); the last one is
    named if the wait times out."""
    started = time.perf_counter()
    last_error: OSError | None = None
    while True:
        try:
            if predicate():
                return time.perf_counter()
        except OSError as exc:  # URLError, RemoteDisconnected, ConnectionRefusedError, ...
            last_error = exc
        if time.perf_counter() - started > timeout:
            detail = f" (last connection error: {last_error!r})" if last_error is not None else ""
            raise TimeoutError(f"{what} did not happen within {timeout:.0f}s{detail}")
        time.sleep(0.1)


def copy_seconds(model_dir: str) -> tuple[float, float]:
    """The host → device copy of the weights, measured here: on a CPU box, a clone (memcpy) of them.

    Returns (into new memory, into reused memory). The replica copies into tensors it has just
    allocated, so its pages fault in during the copy: the first clone does the same work. Later
    clones reuse the pages the allocator kept from the one before (the reused figure, a floor).
    """
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update({k: v.clone() for k, v in load_file(shard).items()})  # resident, not mmapped
    samples = []
    for _ in range(3):
        started = time.perf_counter()
        copies = [t.clone() for t in tensors.values()]
        samples.append(time.perf_counter() - started)
        del copies
    return samples[0], min(samples[1:])


def activate(rest: Any, config: dict[str, Any], client: Any, url: str,
             source: str) -> tuple[float, dict[str, Any], float]:
    """PUT `config` (the big model Hot), time it to the first successful trace; check where the new
    replica's weights came from. Returns (seconds, the model's /status entry, PUT epoch)."""
    put, put_epoch = time.perf_counter(), time.time()
    rest.apply(config)
    seconds = first_trace_after(client) - put
    status = big_status(url)
    assert status.get("load_source") == source, f"expected weights from {source}: {status}"
    return seconds, status, put_epoch


def activation_round(mode: Any, client: Any, big_dir: str) -> dict[str, float]:
    rest, url = mode.rest, mode.ndif_host
    hot, warm, cold = (replanned(mode, big_level=None, activated=True),
                       replanned(mode, big_level=None, activated=False),
                       replanned(mode, big_level="Cold", activated=False))
    app = next(a["name"] for a in hot["applications"] if a["name"].endswith("-big"))
    row: dict[str, float] = {}

    # COLD → HOT: the app appears; its replica reads the checkpoint and fills the store.
    rest.apply(cold)
    wait_until(lambda: app not in rest.details().get("applications", {}), 180, "the big app's removal")
    wait_until(lambda: big_status(url).get("deployment_level") == "COLD", 60, "COLD in the routing table")
    time.sleep(1.0)  # the gateway evicts the host copy in the background
    row["cold"], status, _ = activate(rest, hot, client, url, "localPath")
    marks = status.get("replica_startup") or {}
    if marks:  # the weights phase of a cold start: read the checkpoint, fill the store, (copy)
        row["cold_weights"] = marks["ready"] - marks["imported"]

    # HOT → WARM: the replica drops its own copy (the store keeps one); in place where the render allows.
    put = time.perf_counter()
    rest.apply(warm)
    row["hot_to_warm"] = wait_until(lambda: big_status(url).get("deployment_level") == "WARM", 300,
                                    "WARM") - put
    wait_until(lambda: rest.details()["applications"].get(app, {}).get("status") == "RUNNING", 300,
               "the WARM app RUNNING")

    # WARM → HOT: the rendered change; the replica (kept, or a new one) copies the node's copy.
    before = big_status(url).get("replica_startup") or {}
    row["warm"], status, put_epoch = activate(rest, hot, client, url, "nodeMemory")
    marks = status.get("replica_startup") or {}
    copies = [t for t in status.get("transitions") or [] if t.get("to_level") == "Hot"]
    last = copies[-1] if copies else {}
    row["replica_move"] = float(last.get("seconds", float("nan")))  # the whole level move in the replica
    row["replica_copy"] = float(last.get("copy_seconds") or row["replica_move"])  # of it, the weights' copy
    row["in_place"] = float(bool(marks) and marks.get("process_started") == before.get("process_started"))
    if row["in_place"] and copies:  # Serve called reconfigure on the WARM replica
        began = float(copies[-1].get("started_at") or float("nan"))
        row["to_move"] = began - put_epoch
        row["after_ready"] = row["warm"] - (began + row["replica_move"] - put_epoch)
    elif marks:  # Serve replaced the replica
        row["to_process"] = marks["process_started"] - put_epoch
        row["imports"] = marks["imported"] - marks["process_started"]
        row["map"] = marks["loaded"] - marks["imported"]
        row["warm_weights"] = marks["ready"] - marks["imported"]
        row["after_ready"] = row["warm"] - (marks["ready"] - put_epoch)
    row["bench_copy"], row["bench_copy_reused"] = copy_seconds(big_dir)
    return row


# --- main -----------------------------------------------------------------------------------------


def build_models(workdir: Path, layers: int) -> tuple[str, str, int]:
    from model_runtime.tiny_models import build_tiny_model

    tiny = build_tiny_model("llama", workdir / "tiny-llama")
    big = build_tiny_model("llama", workdir / "big-llama", config_overrides={
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": layers,
        "num_attention_heads": 16, "num_key_value_heads": 4})
    weights = sum(p.stat().st_size for p in big.glob("*.safetensors"))
    return str(tiny), str(big), weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=40, help="interleaved latency iterations")
    parser.add_argument("--rounds", type=int, default=2,
                        help="COLD/WARM/HOT activation rounds (0: the request path only, no headline)")
    parser.add_argument("--layers", type=int, default=10, help="decoder layers of the big model (10: ~600 MB)")
    parser.add_argument("--port-offset", type=int, default=400)
    args = parser.parse_args(argv)
    # The models (over 500 MB) live only as long as the run: a shared machine's disk fills otherwise.
    with tempfile.TemporaryDirectory(prefix="ndif-bench-") as workdir:
        return run(args, Path(workdir))


def run(args: argparse.Namespace, workdir: Path) -> int:
    import torch

    from ndif_operator.local import LocalMode, LocalSettings, RayPorts

    torch.set_num_threads(1)
    print(machine_line(), flush=True)
    tiny_dir, big_dir, weights = build_models(workdir, args.layers)
    print(f"models: tiny Llama (latency), Llama with {weights / 1e6:.0f} MB of float32 weights (activation)",
          flush=True)
    (workdir / "bench.yaml").write_text(MANIFEST.format(tiny=tiny_dir, big=big_dir))
    settings = LocalSettings(manifests=(workdir / "bench.yaml",), ports=RayPorts.offset(args.port_offset),
                             num_cpus=2, deploy_timeout_s=900)
    with LocalMode(settings, log=lambda m: print(f"  [local] {m}", flush=True)) as mode:
        url = mode.ndif_host  # the gateway's own listener: what clients are given
        urls = {DOOR: url, PROXY: mode.serve_url}
        assert mode.head is not None
        processes = server_processes(mode.head.spec.resolved_temp_dir)
        paths = request_path(urls, tiny_dir, args.iterations, processes)
        path = paths[DOOR]
        for label, one in paths.items():
            print(f"\nrequest path through {label}, {args.iterations} interleaved iterations (medians):")
            print(f"  plain HF forward:           {ms(one['plain'])}")
            print(f"  local nnsight trace:        {ms(one['local'])}  ({one['local'] / one['plain']:.1f}x plain)")
            print(f"  remote round trip:          {ms(one['remote'])}  ({one['remote'] / one['local']:.1f}x local)")
            print(f"  client's own costs:         {ms(one['client_own'])}  (named steps' wall time + the CPU time "
                  f"of the rest of its work; named: serialise {ms(one['client serialize'])}, httpx.Client() "
                  f"{ms(one['client httpx_client'])}, parse {ms(one['client parse'])}, load result "
                  f"{ms(one['client finalize'])})")
            print(f"  server-side overhead:       {ms(one['overhead'])}  (round trip - client's own - local trace; "
                  f"subtracting only the named steps: {ms(one['overhead_named'])})")
            vias = ", ".join(f"{k[4:]} {v:.0f}" for k, v in one.items() if k.startswith("via "))
            print(f"  gateway → replica path of the timed jobs: {vias or 'unknown'} (NDIF_DIRECT_CHANNEL="
                  f"{os.environ.get('NDIF_DIRECT_CHANNEL', 'on (default)')})")
            print("  server-side steps (medians; one clock, one machine):")
            for key, value in one.items():
                if key.startswith("step "):
                    print(f"    {key[5:]:<55} {ms(value)}")
        cpu = {k[4:]: v for k, v in path.items() if k.startswith("cpu ")}
        if cpu:
            print("  server processes' CPU per remote request (both ingresses' requests, whole processes, "
                  "background work included): " + ", ".join(f"{name} {ms(value)}" for name, value in cpu.items()))
        print(f"  per-request gc here: full gc.collect() {ms(path['gc full'])}, collect_request_garbage() after "
              f"gc.freeze() {path['gc request'] * 1e6:.1f} us")

        if args.rounds == 0:  # the request path only (a quick look; the headline needs both)
            print(f"request path only: server-side overhead {path['overhead'] * 1000:.1f} ms (round trip "
                  f"{ms(path['remote'])} - client {ms(path['client_own'])} - local trace {ms(path['local'])})")
            return 0
        big_client = connect_client(big_dir, "ndif-bench/big-llama", url)
        rows = []
        for index in range(args.rounds):
            row = activation_round(mode, big_client, big_dir)
            rows.append(row)
            print(f"\nactivation round {index + 1}: cold {row['cold']:.2f} s, warm {row['warm']:.2f} s "
                  f"(cold/warm {row['cold'] / row['warm']:.1f}x), hot→warm {row['hot_to_warm']:.2f} s", flush=True)
        cold = med([r["cold"] for r in rows])
        warm = med([r["warm"] for r in rows])
        bench_copy = med([r["bench_copy"] for r in rows])
        bench_copy_reused = med([r["bench_copy_reused"] for r in rows])
        replica_copy = med([r["replica_copy"] for r in rows])
        startup = warm - replica_copy
        print(f"\nactivation to first trace, {args.rounds} interleaved rounds (medians), {weights / 1e6:.0f} MB:")
        print(f"  COLD → HOT (new app; replica reads the checkpoint, fills the node's store): {cold:.2f} s")
        print(f"  WARM → HOT (rendered change; the node's copy → the replica's device):    {warm:.2f} s")
        print(f"  HOT → WARM (rendered change; the replica keeps only the store's copy):  "
              f"{med([r['hot_to_warm'] for r in rows]):.2f} s")
        def split(key: str) -> float:
            return med([r.get(key, float("nan")) for r in rows])

        in_place = all(r["in_place"] for r in rows)
        if in_place:
            print(f"  warm split (replica process kept: Serve applied the level with reconfigure): PUT → "
                  f"reconfigure {split('to_move'):.2f} s, level move {split('replica_move'):.2f} s (copy "
                  f"{replica_copy:.2f} s, then gc freeze and weight guard), moved → first trace "
                  f"{split('after_ready'):.2f} s")
        else:
            print(f"  warm split (replica replaced in {sum(not r['in_place'] for r in rows)} of {len(rows)} rounds): "
                  f"PUT → replica process {split('to_process'):.2f} s, process start + imports (Ray worker, Serve, "
                  f"torch, nnsight) {split('imports'):.2f} s, skeleton + mapping {split('map'):.2f} s, copy "
                  f"{replica_copy:.2f} s, ready → first trace {split('after_ready'):.2f} s")
            print(f"  the weights phase alone (imports done → replica ready): cold {split('cold_weights'):.2f} s "
                  f"(read the checkpoint, fill the store) vs warm {split('warm_weights'):.2f} s (skeleton, map, "
                  f"copy): {split('cold_weights') / split('warm_weights'):.1f}x")
        print(f"  the weights' host → device copy measured here (CPU: clone into new memory, as the replica "
              f"copies): {bench_copy:.2f} s (into reused memory: {bench_copy_reused:.2f} s); in the replica: "
              f"{replica_copy:.2f} s")
        print(f"  fixed start-up (warm - the replica's copy): {startup:.2f} s; warm = {startup:.2f} s + "
              f"{warm - startup:.2f} s copy; copy / measured copy = {replica_copy / bench_copy:.1f}x (target ≤ 2x)")
    print(f"headline: cold/warm activation {cold / warm:.1f}x ({cold:.2f} s vs {warm:.2f} s, {weights / 1e6:.0f} MB: "
          f"{startup:.2f} s start-up + {replica_copy:.2f} s copy, copy {replica_copy / bench_copy:.1f}x the measured "
          f"memcpy); server-side overhead {path['overhead'] * 1000:.1f} ms (round trip {ms(path['remote'])} - client "
          f"CPU {ms(path['client_own'])} - local trace {ms(path['local'])}; subtracting only the client's named "
          f"steps {path['overhead_named'] * 1000:.1f} ms; through Serve's proxy "
          f"{paths[PROXY]['overhead'] * 1000:.1f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

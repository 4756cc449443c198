"""Per-request cost of the sandbox on the tiny model, end to end and split by layer.

    .venv/bin/python bench/sandbox.py [iterations]      # default 300 interleaved requests per path
    .venv/bin/python bench/sandbox.py --help

One real client payload (the unmodified nnsight client, a trace that saves two hidden states and
the logits) is executed over and over against a dispatched tiny llama:

* baseline: the runtime's unsandboxed path, `model_runtime.replica.execution.execute_request` (its
  long-lived request thread, `RequestModel.deserialize`, `tracer.execute`, `torch.save`), including its
  per-request young-generation collection (`model_runtime.replica.garbage`), which is cheap once the
  model's objects are frozen and costs the same on both sides (a full `gc.collect()` is timed
  separately for reference);
* sandboxed: the same `execute_request` with `runner=model_runtime.sandbox.executor.SANDBOXED`
  (what `select_runner()` picks unless NDIF_SANDBOX=0), every layer including a seccomp filter on
  the request thread (installed once per thread, at its first request);
* no_seccomp: the sandboxed seam, same sandbox and model context, on a request thread of its own
  that never installs the filter (the filter's share: once installed, it costs a cached
  allow per syscall, ~12 syscalls per request);
* standalone: `Sandbox.execute` (dedicated seccomp'd worker thread, own serialisation);
* python_mode: the sandboxed seam with the write guard as the Python dispatch mode (the fallback
  when the native kernels are not built), for comparison in the same run;
* no_write_guard: the sandboxed seam with every layer but the write guard (the guard's share).

The paths alternate request by request so machine noise hits them alike; each ratio is reported
with the interquartile range of the ratios of interleaved pairs. The headline's sandboxed request
follows a baseline one (the sandbox's own code and data start cold); each round also runs the
baseline and the sandboxed seam a second time right after the first, and prints that pair's ratio
("back to back": each request after one of its own kind, as a replica serves them). Then each
layer is timed alone on the same payload (stock vs sandboxed where there is a stock equivalent), and the baseline,
sandboxed and Python-mode seams are compared again on a ~107M-parameter llama built offline,
where a real model's compute dominates (`large model: sandboxed / unsandboxed = X.XXx`). Medians;
the LAST line is the tiny model's headline ratio.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import pickle
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PROMPT = "The Eiffel Tower is in the city of"


def _median_ms(fn: Callable[[], Any], n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


# A llama with ~107M parameters, built offline: where a real model's compute dominates.
LARGE: dict[str, object] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 14, "num_attention_heads": 12,
    "num_key_value_heads": 12,
}


def _served(config_overrides: dict[str, object] | None) -> tuple[Any, Any, Any, bytes]:
    """Build a model offline, load it as client (meta) and server (dispatched, frozen) and capture
    one real client payload for it: (client, server, request envelope, blob)."""
    import nnsight
    import nnsight.modeling.huggingface as hf
    from nnsight.intervention.backends.remote import RemoteBackend
    from transformers import AutoTokenizer

    from model_runtime.tiny_models import build_tiny_model

    path = Path(tempfile.mkdtemp()) / ("large-llama" if config_overrides else "tiny-llama")
    build_tiny_model("llama", path, config_overrides=config_overrides)
    hf._ID_CACHE[str(path)] = str(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    client = nnsight.TransformersModel(str(path), task="text-generation", tokenizer=tokenizer, dispatch=False)
    server = nnsight.TransformersModel(
        str(path), task="text-generation", tokenizer=tokenizer, device_map="cpu", dispatch=True
    )
    server._module.requires_grad_(False)
    captured: list[tuple[Any, bytes]] = []

    class Capture(RemoteBackend):
        def request(self, request: Any, tracer: Any) -> Any:
            captured.append((request, self._serialize(tracer)))
            return {}

    backend = Capture(client.to_model_key(), host="http://bench.invalid", env=client._remoteable_get_env())
    with client.trace(PROMPT, backend=backend):
        a = client.model.layers[0].output.save()  # noqa: F841 - only the payload matters
        b = client.model.layers[1].mlp.output.save()  # noqa: F841
        logits = client.lm_head.output.save()  # noqa: F841
    request, blob = captured[0]
    return client, server, request, blob


def _seam(server: Any, request: Any, blob: bytes, runner: Any) -> Callable[[], None]:
    """One request through the runtime's seam (`execute_request`) with `runner`."""
    from model_runtime.replica import execution

    envelope = execution.Envelope(**request.model_dump())
    limits = execution.ExecutionLimits(timeout_seconds=600)

    def run() -> None:
        out = execution.execute_request(server, blob, envelope, limits=limits, on_log=lambda _l: None, runner=runner)
        assert out.error is None, out.error

    return run


def _interleaved(runs: dict[str, Callable[[], None]], iterations: int, warmup: int = 5) -> dict[str, list[float]]:
    """Samples (ms) per path, the paths alternating call by call so machine noise hits them alike:
    wall time under the path's name, and the process's CPU time under `<name>/cpu` (all threads;
    it leaves out the time spent waiting for a core, so it moves less with other processes' load)."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {key: [] for name in runs for key in (name, f"{name}/cpu")}
    for _ in range(iterations):
        for name, fn in runs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
            samples[f"{name}/cpu"].append((time.process_time() - c0) * 1e3)
    return samples


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def _spread(samples: dict[str, list[float]], path: str, base: str = "baseline") -> str:
    """Spread and precision of a path's ratio to the baseline: the interquartile range of the ratio
    of each interleaved pair (request i of `path` over request i of the baseline), and a 95%
    bootstrap interval of the ratio of medians (resampling the interleaved rounds)."""
    pairs = list(zip(samples[path], samples[base], strict=True))
    q = statistics.quantiles(sorted(a / b for a, b in pairs), n=4)
    rng = random.Random(0)
    boot = sorted(
        statistics.median(a for a, _ in draw) / statistics.median(b for _, b in draw)
        for draw in ([rng.choice(pairs) for _ in pairs] for _ in range(1000))
    )
    return f"paired ratio IQR {q[0]:.2f}-{q[2]:.2f}x, 95% CI {boot[25]:.2f}-{boot[974]:.2f}x"


@contextlib.contextmanager
def _python_mode() -> Iterator[None]:
    """Requests run under the Python dispatch mode (the guard's fallback) instead of the native kernels."""
    from model_runtime.sandbox import executor
    from model_runtime.sandbox.dispatch_guard import PythonWriteGuard

    previous = vars(executor)["WriteGuard"]
    setattr(executor, "WriteGuard", PythonWriteGuard)  # noqa: B010 - swapped for this block only
    try:
        yield
    finally:
        setattr(executor, "WriteGuard", previous)  # noqa: B010


def _under_python_mode(run: Callable[[], None]) -> Callable[[], None]:
    def wrapped() -> None:
        with _python_mode():
            run()

    return wrapped


def _without_write_guard(run: Callable[[], None]) -> Callable[[], None]:
    """The sandboxed seam with no write guard at all (every other layer on): the guard's share."""
    from model_runtime.sandbox import executor

    def wrapped() -> None:
        previous = vars(executor)["WriteGuard"]
        setattr(executor, "WriteGuard", lambda _storage: contextlib.nullcontext())  # noqa: B010
        try:
            run()
        finally:
            setattr(executor, "WriteGuard", previous)  # noqa: B010

    return wrapped


def large_model(iterations: int) -> tuple[dict[str, list[float]], int]:
    """(samples per path, parameters) on the ~107M-parameter llama."""
    from model_runtime.replica import execution
    from model_runtime.sandbox import executor

    _client, server, request, blob = _served(LARGE)
    params = sum(p.numel() for p in server._module.parameters())
    sandboxed = _seam(server, request, blob, executor.SANDBOXED)
    samples = _interleaved(
        {"baseline": _seam(server, request, blob, execution.PLAIN), "sandboxed": sandboxed,
         "python_mode": _under_python_mode(sandboxed)},
        iterations, warmup=3,
    )
    return samples, params


def main(iterations: int) -> None:
    import torch
    from nnsight.intervention.serialization import CustomCloudUnpickler

    from model_runtime.replica import execution
    from model_runtime.sandbox import Limits, Sandbox, executor
    from model_runtime.sandbox.capabilities import Capabilities
    from model_runtime.sandbox.compiling import restricted_compile
    from model_runtime.sandbox.dispatch_guard import PythonWriteGuard, ServerStorage, WriteGuard
    from model_runtime.sandbox.finalisers import release_request_objects
    from model_runtime.sandbox.global_state import GlobalState
    from model_runtime.sandbox.guards import Guards
    from model_runtime.sandbox.integrity import WeightIntegrity
    from model_runtime.sandbox.limits import address_space_cap, check_payload
    from model_runtime.sandbox.model_guard import ProcessState, WeightGuard
    from model_runtime.sandbox.seccomp import install_request_filter as install_seccomp
    from model_runtime.sandbox.unpickling import SandboxUnpickler, _DryRun, loads

    torch.set_num_threads(1)
    _client, server, request, blob = _served(None)
    sandbox = Sandbox(Limits(timeout_s=60))
    sandbox_calls: list[int] = []
    real_sandboxed = executor.run_blob

    def counting_run_blob(model: Any, data: bytes, env: Any) -> dict[str, Any]:
        sandbox_calls.append(1)
        return real_sandboxed(model, data, env)

    baseline = _seam(server, request, blob, execution.PLAIN)
    sandboxed = _seam(server, request, blob, execution.Runner(counting_run_blob, collects_garbage=True))

    def standalone() -> None:
        sandbox.execute(server, blob, request)

    def unfiltered_run_blob(model: Any, data: bytes, env: Any) -> dict[str, Any]:
        return real_sandboxed(model, data, env)

    # The same sandbox and model context as `sandboxed`, on a request thread of its own that never
    # installs the filter (the runtime keeps one pool of request threads per runner): only the
    # filter differs.
    unfiltered = _seam(server, request, blob, execution.Runner(unfiltered_run_blob, collects_garbage=True))

    def sandboxed_no_seccomp() -> None:
        default = executor.default_sandbox()
        previous = default.limits
        default.limits = dataclasses.replace(previous, seccomp=False)
        try:
            unfiltered()
        finally:
            default.limits = previous

    import gc

    from model_runtime.replica.garbage import freeze_long_lived

    gc_ms = _median_ms(gc.collect, 5)
    freeze_long_lived()  # as the model app does after loading
    guard_kind = "native dispatcher kernels" if WriteGuard(ServerStorage()).native else "Python mode (fallback!)"
    # Each round: the baseline twice, the sandboxed seam twice, then the variants. The headline pairs
    # the first of each (the sandboxed request follows a baseline one, whose code shares none of
    # the sandbox's, so the sandbox's code and data start cold); the second of each follows a
    # request of its own kind, as a replica serves them back to back (printed for comparison).
    samples = _interleaved(
        {"baseline": baseline, "baseline_again": baseline, "sandboxed": sandboxed, "sandboxed_again": sandboxed,
         "no_seccomp": sandboxed_no_seccomp, "standalone": standalone,
         "python_mode": _under_python_mode(sandboxed), "no_write_guard": _without_write_guard(sandboxed)},
        iterations,
    )
    med = {k: _median(v) for k, v in samples.items()}
    assert sandbox_calls, "the sandbox runner did not run"

    # -- layer by layer on the same payload -------------------------------------------------------
    n = max(iterations, 50)
    raw = check_payload(blob, request.compress, Limits())
    persistent = server._remoteable_persistent_objects()
    weights = WeightGuard([server._module])
    guards = Guards(Capabilities(is_protected=weights.is_protected), weights.is_protected)
    _tracer, (source, _g, _l) = CustomCloudUnpickler(io.BytesIO(raw), persistent).load()
    filename = _tracer.info.frame.f_code.co_filename

    def seccomp_thread() -> None:
        thread = threading.Thread(target=install_seccomp)
        thread.start()
        thread.join()

    def plain_thread() -> None:
        thread = threading.Thread(target=lambda: None)
        thread.start()
        thread.join()

    class _RealLoadOnly(SandboxUnpickler):
        def load(self) -> Any:
            return pickle.Unpickler.load(self)

    def capped() -> None:
        with address_space_cap(8 * 1024**3):
            pass

    def state_roundtrip() -> None:
        ProcessState.capture().restore()

    integrity = WeightIntegrity([server._module])

    def weights_roundtrip() -> None:
        weights.arm(integrity.tensors)  # as a request does: on the integrity check's index
        weights.check()

    def integrity_roundtrip() -> None:
        integrity.admit()
        integrity.verify()

    context = sandbox.context(server)

    def runtime_state_roundtrip() -> None:
        context.runtime.begin()  # what a request does: the record is read again only when stale
        context.runtime.verify_and_restore()

    def server_state_roundtrip() -> None:
        context.state.capture()
        context.state.verify_and_restore()

    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])
    guard = WriteGuard(integrity.storage)
    python_guard = PythonWriteGuard(integrity.storage)

    def forward() -> None:
        with torch.no_grad():
            server._module(ids)

    def guarded_forward() -> None:
        with torch.no_grad(), guard:
            server._module(ids)

    def python_guarded_forward() -> None:
        with torch.no_grad(), python_guard:
            server._module(ids)

    fresh = itertools.count()
    layers = [
        ("1 unpickle: stock CustomCloudUnpickler", lambda: CustomCloudUnpickler(io.BytesIO(raw), persistent).load(),
         "1 unpickle: allowlisted (dry run + load, both C)", lambda: loads(raw, persistent, guards)),
        ("2 compile: stock compile()", lambda: compile(source, filename, "exec"),
         "2 compile: RestrictedPython, first time", lambda: restricted_compile(source + f"\n#{next(fresh)}", filename)),
        ("2 compile: stock compile()", lambda: compile(source, filename, "exec"),
         "2 compile: RestrictedPython, memoised", lambda: restricted_compile(source, filename)),
        ("4a model forward (8 tokens)", forward,
         "4a model forward under the write guard", guarded_forward),
        ("4a model forward (8 tokens)", forward,
         "4a model forward under the Python mode", python_guarded_forward),
        ("5 thread: plain start+join", plain_thread,
         "5 thread: + seccomp filter (once per thread)", seccomp_thread),
    ]
    singles = [
        ("1 unpickle: of which the dry run on stand-ins", lambda: _DryRun(raw, persistent).load()),
        ("1 unpickle: of which the real load", lambda: _RealLoadOnly(io.BytesIO(raw), persistent, guards).load()),
        ("4 process state: capture + restore", state_roundtrip),
        ("4 weights: arm + version check", weights_roundtrip),
        ("4b global state: capture + restore", lambda: GlobalState.capture().restore()),
        ("4c integrity: admit + verify (fingerprint)", integrity_roundtrip),
        ("4 provenance: server containers snapshot + verify", server_state_roundtrip),
        ("4 provenance: nnsight runtime state verify", runtime_state_roundtrip),
        ("4 tear-down on the request thread (incl. young gc)", lambda: release_request_objects(server, None)),
        ("5 payload: size check + zstd decompress", lambda: check_payload(blob, request.compress, Limits())),
        ("5 memory: RLIMIT_AS set + restore", capped),
    ]

    print(f"tiny llama, payload {len(blob):,} bytes (zstd), {iterations} interleaved requests each, medians; "
          f"write guard: {guard_kind}")
    rows = [
        ("baseline", "baseline   execute_request, stock run_blob"),
        ("sandboxed", "sandboxed  execute_request, sandbox run_blob"),
        ("no_seccomp", "sandboxed, seccomp filter off"),
        ("standalone", "standalone Sandbox.execute (dedicated worker)"),
        ("python_mode", "sandboxed, write guard as the Python mode"),
        ("no_write_guard", "sandboxed, no write guard (for its share)"),
    ]
    for key, label in rows:
        ratio = "" if key == "baseline" else f"  ({med[key] / med['baseline']:.2f}x, {_spread(samples, key)})"
        print(f"  {label:47s} {med[key]:8.2f} ms{ratio}")
    cpu = {k: med[f"{k}/cpu"] for k in ("baseline", "sandboxed", "python_mode", "no_write_guard")}
    print(f"  process CPU time per request: baseline {cpu['baseline']:.2f} ms, sandboxed {cpu['sandboxed']:.2f} ms "
          f"({cpu['sandboxed'] / cpu['baseline']:.2f}x), Python mode {cpu['python_mode']:.2f} ms "
          f"({cpu['python_mode'] / cpu['baseline']:.2f}x), no write guard {cpu['no_write_guard']:.2f} ms "
          f"({cpu['no_write_guard'] / cpu['baseline']:.2f}x)")
    again = med["sandboxed_again"] / med["baseline_again"]
    print(f"  back to back (each right after a request of its own kind, as a replica serves them): "
          f"sandboxed {med['sandboxed_again']:.2f} ms vs baseline {med['baseline_again']:.2f} ms = {again:.2f}x "
          f"({_spread(samples, 'sandboxed_again', 'baseline_again')})")
    # The filter-off path always runs right after the two sandboxed ones, so its caches are the
    # warmest; on the same footing it compares with the second sandboxed request, not the headline.
    off = med["no_seccomp"] / med["sandboxed_again"]
    print(f"  seccomp filter off vs on, each after a sandboxed request: {med['no_seccomp']:.2f} ms vs "
          f"{med['sandboxed_again']:.2f} ms = {off:.2f}x ({_spread(samples, 'no_seccomp', 'sandboxed_again')})")
    print(f"  (for reference: a full gc.collect() in this process costs {gc_ms:.1f} ms; requests collect young)")
    print("cost split by layer (each alone, same payload):")
    for stock_name, stock_fn, box_name, box_fn in layers:
        s_ms, b_ms = _median_ms(stock_fn, n), _median_ms(box_fn, n)
        print(f"  {stock_name:45s} {s_ms:8.3f} ms")
        print(f"  {box_name:45s} {b_ms:8.3f} ms  (+{b_ms - s_ms:.3f} ms)")
    for name, fn in singles:
        print(f"  {name:45s} {_median_ms(fn, n):8.3f} ms")
    timings = sandbox.execute(server, blob, request).meta["sandbox"]["timings"]
    print("  standalone request's own split: " + ", ".join(f"{k}={v * 1e3:.2f} ms" for k, v in timings.items()))
    large_n = max(20, iterations // 3)
    large, params = large_model(large_n)
    big = {k: _median(v) for k, v in large.items()}
    big_cpu = {k: big[f"{k}/cpu"] / big["baseline/cpu"] for k in ("sandboxed", "python_mode")}
    print(f"large model, process CPU time per request: sandboxed / unsandboxed = {big_cpu['sandboxed']:.2f}x, "
          f"Python mode {big_cpu['python_mode']:.2f}x")
    print(f"large model, write guard as the Python mode: {big['python_mode'] / big['baseline']:.2f}x "
          f"({big['python_mode']:.1f} ms; {_spread(large, 'python_mode')})")
    print(f"large model: sandboxed / unsandboxed = {big['sandboxed'] / big['baseline']:.2f}x "
          f"({big['sandboxed']:.1f} ms vs {big['baseline']:.1f} ms; {_spread(large, 'sandboxed')}; "
          f"llama {params / 1e6:.0f}M parameters, {large_n} interleaved requests each; target <= 1.1x)")
    print(f"headline: sandboxed / unsandboxed median per request = {med['sandboxed'] / med['baseline']:.2f}x "
          f"({med['sandboxed']:.2f} ms vs {med['baseline']:.2f} ms; {_spread(samples, 'sandboxed')}; "
          f"target <= 1.3x)")


def cli(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("iterations", nargs="?", type=int, default=300,
                        help="interleaved requests per path on the tiny model (default 300; the large model "
                             "runs a third as many, at least 20)")
    args = parser.parse_args(argv)
    if args.iterations < 1:
        parser.error("iterations must be at least 1")
    main(args.iterations)


if __name__ == "__main__":
    cli()

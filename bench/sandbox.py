"""Per-request cost of the sandbox on the tiny model, end to end and split by layer.

    .venv/bin/python bench/sandbox.py [iterations]

One real client payload (the unmodified nnsight client, a trace that saves two hidden states and
the logits) is executed over and over against a dispatched tiny llama:

* baseline: the runtime's unsandboxed path, `model_runtime.execution.execute_request` (its
  long-lived request thread, `RequestModel.deserialize`, `tracer.execute`, `torch.save`), including its
  per-request young-generation collection (`model_runtime.garbage`), which is cheap once the
  model's objects are frozen and costs the same on both sides (a full `gc.collect()` is timed
  separately for reference);
* sandboxed: the same `execute_request` with `runner=model_runtime.sandbox.executor.run_blob`
  (what `select_runner()` picks unless NDIF_SANDBOX=0), every layer including a seccomp filter on
  the request thread (installed once per thread, at its first request);
* standalone: `Sandbox.execute` (dedicated seccomp'd worker thread, own serialisation).

The three alternate request by request so machine noise hits them alike. Then each layer is
timed alone on the same payload (stock vs sandboxed where there is a stock equivalent). Medians;
the LAST line is the headline ratio.
"""

from __future__ import annotations

import io
import itertools
import pickle
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
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


def main(iterations: int) -> None:
    import nnsight
    import nnsight.modeling.huggingface as hf
    import torch
    from nnsight.intervention.backends.remote import RemoteBackend
    from nnsight.intervention.serialization import CustomCloudUnpickler
    from transformers import AutoTokenizer

    from model_runtime import execution
    from model_runtime.sandbox import Limits, Sandbox, executor
    from model_runtime.sandbox.capabilities import Capabilities
    from model_runtime.sandbox.compiling import restricted_compile
    from model_runtime.sandbox.guards import Guards
    from model_runtime.sandbox.limits import address_space_cap, check_payload, install_seccomp
    from model_runtime.sandbox.model_guard import ProcessState, WeightGuard
    from model_runtime.sandbox.unpickling import SandboxUnpickler, _DryRun, loads
    from model_runtime.tiny_models import build_tiny_model

    torch.set_num_threads(1)
    path = Path(tempfile.mkdtemp()) / "tiny-llama"
    build_tiny_model("llama", path)
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
    envelope = execution.Envelope(**request.model_dump())
    limits = execution.ExecutionLimits(timeout_seconds=60)
    stock_run_blob = execution.run_blob
    sandbox = Sandbox(Limits(timeout_s=60))
    sandbox_calls: list[int] = []
    real_sandboxed = executor.run_blob

    def counting_run_blob(model: Any, data: bytes, env: Any) -> dict[str, Any]:
        sandbox_calls.append(1)
        return real_sandboxed(model, data, env)



    def baseline() -> None:
        out = execution.execute_request(
            server, blob, envelope, limits=limits, on_log=lambda _l: None, runner=stock_run_blob
        )
        assert out.error is None, out.error

    def sandboxed() -> None:
        out = execution.execute_request(
            server, blob, envelope, limits=limits, on_log=lambda _l: None, runner=counting_run_blob
        )
        assert out.error is None, out.error
        assert sandbox_calls, "the sandbox runner did not run"

    def standalone() -> None:
        sandbox.execute(server, blob, request)

    no_filter = Sandbox(Limits(timeout_s=60, seccomp=False))

    def sandboxed_no_seccomp() -> None:
        previous = executor._DEFAULT
        executor._DEFAULT = no_filter
        try:
            out = execution.execute_request(
                server, blob, envelope, limits=limits, on_log=lambda _l: None, runner=executor.run_blob
            )
        finally:
            executor._DEFAULT = previous
        assert out.error is None, out.error

    import gc

    from model_runtime.garbage import freeze_long_lived

    gc_ms = _median_ms(gc.collect, 5)
    freeze_long_lived()  # as the model app does after loading
    runs = {"baseline": baseline, "sandboxed": sandboxed, "no_seccomp": sandboxed_no_seccomp, "standalone": standalone}
    for fn in runs.values():  # warm-up: imports, allocator, caches
        for _ in range(5):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(iterations):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}

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

    def weights_roundtrip() -> None:
        weights.arm()
        weights.check()

    fresh = itertools.count()
    layers = [
        ("1 unpickle: stock CustomCloudUnpickler", lambda: CustomCloudUnpickler(io.BytesIO(raw), persistent).load(),
         "1 unpickle: allowlisted (dry run + load, both C)", lambda: loads(raw, persistent, guards)),
        ("2 compile: stock compile()", lambda: compile(source, filename, "exec"),
         "2 compile: RestrictedPython, first time", lambda: restricted_compile(source + f"\n#{next(fresh)}", filename)),
        ("2 compile: stock compile()", lambda: compile(source, filename, "exec"),
         "2 compile: RestrictedPython, memoised", lambda: restricted_compile(source, filename)),
        ("5 thread: plain start+join", plain_thread,
         "5 thread: + seccomp filter (once per thread)", seccomp_thread),
    ]
    singles = [
        ("1 unpickle: of which the dry run on stand-ins", lambda: _DryRun(raw, persistent).load()),
        ("1 unpickle: of which the real load", lambda: _RealLoadOnly(io.BytesIO(raw), persistent, guards).load()),
        ("4 process state: capture + restore", state_roundtrip),
        ("4 weights: arm + version check", weights_roundtrip),
        ("5 payload: size check + zstd decompress", lambda: check_payload(blob, request.compress, Limits())),
        ("5 memory: RLIMIT_AS set + restore", capped),
    ]

    print(f"tiny llama, payload {len(blob):,} bytes (zstd), {iterations} interleaved requests each, medians")
    print(f"  baseline   execute_request, stock run_blob      {med['baseline']:8.2f} ms")
    print(f"  sandboxed  execute_request, sandbox run_blob    {med['sandboxed']:8.2f} ms"
          f"  ({med['sandboxed'] / med['baseline']:.2f}x)")
    print(f"  sandboxed, seccomp filter off                   {med['no_seccomp']:8.2f} ms"
          f"  ({med['no_seccomp'] / med['baseline']:.2f}x)")
    print(f"  standalone Sandbox.execute (dedicated worker)   {med['standalone']:8.2f} ms"
          f"  ({med['standalone'] / med['baseline']:.2f}x)")
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
    print(f"headline: sandboxed / unsandboxed median per request = {med['sandboxed'] / med['baseline']:.2f}x "
          f"({med['sandboxed']:.2f} ms vs {med['baseline']:.2f} ms; target <= 1.2x)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)

"""The per-request persistent-objects map: nnsight's walk against the replica's recorded map.

    .venv/bin/python bench/persistent_objects.py [--iterations 400]

For two llamas built offline (the tests' tiny one: 2 layers; and 32 layers of hidden size 64, the
envoy tree of a 32-layer Llama), in one process with one torch thread:

1. the map alone: `model._remoteable_persistent_objects()` (nnsight's walk of every envoy) and
   `persistent_objects(model)` (the replica's: the record's check, then a new dict), interleaved
   call by call, thread CPU time per call; every result is checked equal to nnsight's;
2. whole requests through the unsandboxed seam (`execution.run_blob` on this thread: set the
   environment, deserialise a real client payload against the map, run the trace), alternating
   between the two maps: the request's thread CPU, and the map's where the seam computes it
   (caches as a request leaves them, not a tight loop's);
3. the same through the sandboxed seam (`execute_request(..., runner=SANDBOXED)`): the map's
   thread CPU inside the sandbox's request scope and guards.

Prints medians and means (µs) and the saving per request. The last line is the headline.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from model_runtime.replica import execution
from model_runtime.replica.persistent_objects import cache_for, persistent_objects
from model_runtime.tiny_models import build_tiny_model

SHAPES = {"tiny (2 layers)": {}, "32 layers": {"num_hidden_layers": 32}}


def _cpu_us(fn: Callable[[], Any]) -> float:
    start = time.thread_time_ns()
    fn()
    return (time.thread_time_ns() - start) / 1000


def _payload(model: Any) -> bytes:
    from nnsight.schema.request import RequestModel
    from nnsight.tracing.backend import Backend

    class Capture(Backend):  # type: ignore[misc]
        blob = b""

        def __call__(self, tracer: Any) -> None:
            Capture.blob = RequestModel.serialize(tracer, compress=False)

    with model.trace("Deep inference lets researchers", backend=Capture()):
        hidden = model.model.layers[-1].output.save()  # noqa: F841
    return Capture.blob


def _interleaved(a: Callable[[], Any], b: Callable[[], Any], iterations: int) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    for i in range(iterations):
        first, second = (a, b) if i % 2 == 0 else (b, a)
        t1, t2 = _cpu_us(first), _cpu_us(second)
        xs.append(t1 if first is a else t2)
        ys.append(t2 if first is a else t1)
    return xs, ys


def _line(name: str, fresh: list[float], cached: list[float]) -> str:
    mf, mc = statistics.median(fresh), statistics.median(cached)
    return (f"  {name}: nnsight walk median {mf:8.1f} µs (mean {statistics.fmean(fresh):8.1f}) | recorded map median "
            f"{mc:8.1f} µs (mean {statistics.fmean(cached):8.1f}) | saved {mf - mc:8.1f} µs, {mf / mc:5.1f}x")


def measure(name: str, overrides: dict[str, Any], iterations: int, root: Path) -> float:
    from nnsight import TransformersModel

    path = build_tiny_model("llama", root / name.replace(" ", "_"), config_overrides=overrides)
    model = TransformersModel(str(path), task="text-generation", dispatch=True, device_map="cpu")
    def fresh() -> Any:
        return model._remoteable_persistent_objects()

    def cached() -> dict[str, Any]:
        return persistent_objects(model)

    for _ in range(20):
        fresh(), cached()
    ours, theirs = cached(), fresh()
    assert list(ours) == list(theirs) and all(ours[k] is theirs[k] for k in theirs)
    print(f"{name}: {sum(k.startswith('Module:') for k in theirs)} envoys")
    walk, record = _interleaved(fresh, cached, iterations)
    print(_line("map", walk, record))

    blob = _payload(model)
    envelope = execution.Envelope(model_key="k", compress=False)
    requests = max(iterations // 4, 20)
    slow, fast, walk_in, record_in = _in_the_seam(model, blob, envelope, requests, sandboxed=False)
    print(_line("request (unsandboxed seam)", slow, fast))
    print(_line("map inside the unsandboxed seam", walk_in, record_in))
    _, _, walk_in, record_in = _in_the_seam(model, blob, envelope, requests, sandboxed=True)
    print(_line("map inside the sandboxed seam", walk_in, record_in))
    assert cache_for(model).walks == 1, "the tree was walked again without a change"
    return statistics.median(walk) - statistics.median(record)


def _in_the_seam(model: Any, blob: bytes, envelope: Any, requests: int,
                 sandboxed: bool) -> tuple[list[float], list[float], list[float], list[float]]:
    """Requests alternating between nnsight's walk and the record: the whole request's thread CPU
    (unsandboxed: `run_blob` on this thread) and the map's, where the seam computes it (sandboxed:
    inside the sandbox's request scope and guards, through `execute_request` with `SANDBOXED`)."""
    from model_runtime.sandbox import executor

    site: Any = executor if sandboxed else execution
    original = site.persistent_objects
    maps: dict[bool, list[float]] = {False: [], True: []}
    whole: dict[bool, list[float]] = {False: [], True: []}

    def timed(use_record: bool) -> Callable[[Any], Any]:
        def get(m: Any) -> Any:
            start = time.thread_time_ns()
            objects = original(m) if use_record else m._remoteable_persistent_objects()
            maps[use_record].append((time.thread_time_ns() - start) / 1000)
            return objects
        return get

    limits = execution.ExecutionLimits(timeout_seconds=60)
    try:
        for i in range(requests + 4):
            use_record = i % 2 == 0
            site.persistent_objects = timed(use_record)
            if sandboxed:
                out = execution.execute_request(model, blob, envelope, limits=limits, on_log=lambda _: None,
                                                runner=executor.SANDBOXED)
                assert out.error is None, out.error
            else:
                whole[use_record].append(_cpu_us(lambda: execution.run_blob(model, blob, envelope)))
    finally:
        site.persistent_objects = original
    return whole[False][2:], whole[True][2:], maps[False][2:], maps[True][2:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(1)
    saved = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in SHAPES.items():
            saved[name] = measure(name, overrides, args.iterations, Path(tmp))
    print("persistent-objects map saved per request: "
          + ", ".join(f"{name} {us / 1000:.3f} ms" for name, us in saved.items()))


if __name__ == "__main__":
    main()

"""Benchmark: Kubernetes API requests of an idle operator (50 models, 10 simulated minutes).

The operator's real planner (`Reconciler` with its loop, timers and debounce) runs against an
in-memory API server (tests/operator/fake_kube.py) on an asyncio event loop whose clock is
virtual: when nothing is ready, the loop jumps to its next timer instead of sleeping, so ten
minutes of operator time take well under a minute. The watches are played as Kopf plays them:
every change of a ModelDeployment or the RayService (an admin's edit or the operator's own write)
wakes the planner.

Scenario (the one measured on a real API server): one RayService, 50 ModelDeployments (Hot, Warm,
Cold; 5 Warm with activateOnRequest, whose gateway reports no demand), settle, then 12 events
(level and replica edits, one every 10 s), settle 2 minutes, then 10 minutes with no event. Counted
in those 10 minutes (the baseline: its first 2, see BASELINE_IDLE_MINUTES): every request the
planner's passes and polls send (reads and writes; the
watch streams themselves are not counted), per minute and per RayService.

Baseline, same run, same fake server and clock: the planner as it was before it kept one timer
per purpose and wrote whole statuses (reconciler.py at BASELINE_COMMIT, read with `git show`):
its status writes are merge patches, its pending/activation polls add a timer per pass, and it
resyncs every 30 s.

    .venv/bin/python bench/idle_traffic.py

The last line is the headline.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import importlib.util
import selectors
import subprocess
import sys
import tempfile
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "operator")]

from fake_kube import FakeKubeApi  # noqa: E402
from kube_emulator import merge_patch  # noqa: E402
from operator_harness import NAMESPACE, model_deployment, ray_service, size_estimator  # noqa: E402

from ndif_operator.operator.reconciler import Reconciler  # noqa: E402
from ndif_operator.operator.settings import OperatorSettings  # noqa: E402
from ndif_operator.planning.activation import Demand  # noqa: E402

BASELINE_COMMIT = "7baec00"  # main just before the planner's split (one timer per purpose, whole statuses)
MODELS = 50
EVENTS = 12
IDLE_MINUTES = 10.0
# The baseline's passes pile up (each costs ~0.1 s of real CPU here): it is measured over its first
# idle minutes only, which understates it (its rate grows with time), to keep the run short.
BASELINE_IDLE_MINUTES = 2.0
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
WATCHES = ("watch_config_map", "watch_calendar_schedules")


class VirtualClockSelector(selectors.BaseSelector):
    """A selector that never sleeps: with nothing ready it advances the clock by the timeout."""

    def __init__(self) -> None:
        self._real = selectors.DefaultSelector()
        self.now = 0.0

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._real.select(0)
        if ready:
            return ready
        if timeout is None:
            return self._real.select(None)  # no timer at all: wait for real I/O
        self.now += max(timeout, 0.0)
        return []

    def close(self) -> None:
        self._real.close()

    def get_map(self) -> Any:
        return self._real.get_map()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._selector_clock = VirtualClockSelector()
        super().__init__(self._selector_clock)

    def time(self) -> float:
        return self._selector_clock.now


class InlineExecutor(ThreadPoolExecutor):
    """`asyncio.to_thread` without a thread: the (fake, instant) evaluator runs inline, so virtual
    time never jumps while a thread works."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


class WatchedApi(FakeKubeApi):
    """The fake server, plus what Kopf's watches do: a change of a watched object wakes the planner."""

    def __init__(self) -> None:
        super().__init__()
        self.on_change: Callable[[], None] = lambda: None

    def _bump(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.on_change()
        return super()._bump(obj)

    async def replace_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        obj = self.model_deployments[(namespace, name)]
        if obj.get("status") == status:
            self._call("replace_status", namespace, name)
            return copy.deepcopy(obj)  # a no-op write changes nothing: no new version, no event
        return await super().replace_status(namespace, name, status)

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """The baseline's write: a JSON merge patch of `status` (keys it omits stay)."""
        self._call("patch_status", namespace, name)
        obj = self.model_deployments[(namespace, name)]
        merged = merge_patch(copy.deepcopy(obj.get("status") or {}), status)
        if merged == obj.get("status"):
            return copy.deepcopy(obj)
        obj["status"] = merged
        return self._bump(obj)


class QuietGateway:
    """The gateway's /status: nobody asks for the Warm models (counted, never an API request)."""

    def __init__(self) -> None:
        self.reads = 0

    async def demands(self, namespace: str, ray_service: str) -> dict[str, Demand]:
        self.reads += 1
        return {}

    async def wait_demand(self, namespace: str, ray_service: str, since: int,
                          timeout_s: float = 30.0) -> tuple[int, dict[str, Demand]] | None:
        """The gateway's /demand long-poll: nobody asks, so it answers empty at its timeout."""
        self.reads += 1
        await asyncio.sleep(timeout_s)
        return max(since, 0), {}


def _fleet(api: FakeKubeApi) -> None:
    api.add(ray_service(groups=(("gpu", 4, 8, "80Gi"),)))
    for i in range(MODELS):
        spec: dict[str, Any] = {}
        if i % 10 < 5:
            spec["level"] = "Hot"
        elif i % 10 < 8:
            spec["level"] = "Warm"
            spec["activateOnRequest"] = i % 10 == 5
        else:
            spec["level"] = "Cold"
        api.add(model_deployment(f"m{i:02d}", f"org/m{i:02d}-{2 + i % 7}g", **spec))


def _edit(api: FakeKubeApi, index: int) -> None:
    """The 12 events: level changes (Hot → Cold, Cold → Hot) and replica edits."""
    name = f"m{index * 4 % MODELS:02d}"
    obj = api.model_deployments[(NAMESPACE, name)]
    if index % 2 == 0:
        api.edit_spec("ModelDeployment", NAMESPACE, name, level="Cold" if obj["spec"].get("level") != "Cold" else "Hot")
    else:
        api.edit_spec("ModelDeployment", NAMESPACE, name, replicas=int(obj["spec"].get("replicas") or 1) + 1)


@dataclass
class Result:
    label: str
    requests: int
    reads: int
    writes: int
    passes: int
    gateway_reads: int
    stale_fields: int
    minutes: float

    @property
    def per_minute(self) -> float:
        return self.requests / self.minutes


def _baseline_class() -> type:
    """The planner at BASELINE_COMMIT, loaded from git as its own module."""
    source = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:ndif_operator/operator/reconciler.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_reconciler.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_reconciler", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.Reconciler  # type: ignore[no-any-return]


async def _scenario(baseline: bool) -> Result:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(InlineExecutor())
    api = WatchedApi()
    _fleet(api)
    gateway = QuietGateway()
    clock = lambda: EPOCH + timedelta(seconds=int(loop.time()))  # noqa: E731
    if baseline:
        settings = OperatorSettings(metrics_port=0, resync_seconds=30.0)  # its default then
        planner: Any = _baseline_class()(api, settings, estimator=size_estimator, clock=clock)
        planner._gateway = gateway
    else:
        planner = Reconciler(api, OperatorSettings(metrics_port=0), estimator=size_estimator,  # type: ignore[arg-type]
                             clock=clock, gateway=gateway)  # type: ignore[arg-type]
    api.on_change = planner.wake
    task = loop.create_task(planner.run())
    planner.wake()  # start-up
    await asyncio.sleep(120)
    for index in range(EVENTS):
        _edit(api, index)
        planner.wake()  # the watch event of the admin's edit
        await asyncio.sleep(10)
    await asyncio.sleep(120)
    calls, passes, gateway_reads = len(api.calls), planner.passes, gateway.reads
    minutes = BASELINE_IDLE_MINUTES if baseline else IDLE_MINUTES
    await asyncio.sleep(minutes * 60)
    window = [c for c in api.calls[calls:] if c[0] not in WATCHES]
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    reads = sum(1 for c in window if c[0].startswith(("list_", "get_", "read_")))
    stale = sum(1 for (_, name), o in api.model_deployments.items()
                if (o.get("status") or {}).get("level") == "Cold" and "placement" in (o.get("status") or {}))
    label = f"baseline ({BASELINE_COMMIT})" if baseline else "operator"
    return Result(label, len(window), reads, len(window) - reads, planner.passes - passes,
                  gateway.reads - gateway_reads, stale, minutes)


def _run(coroutine: Coroutine[Any, Any, Result]) -> Result:
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    import logging
    import time

    logging.basicConfig(level=logging.ERROR)
    started = time.perf_counter()
    baseline = _run(_scenario(baseline=True))
    ours = _run(_scenario(baseline=False))
    for result in (baseline, ours):
        print(f"{result.label:20s} {result.requests:5d} requests in {result.minutes:.0f} idle minutes "
              f"({result.reads} reads, {result.writes} writes), {result.passes} passes, "
              f"{result.gateway_reads} gateway /status reads, Cold models still showing a placement: "
              f"{result.stale_fields}")
    ratio = ours.per_minute / baseline.per_minute if baseline.per_minute else float("nan")
    print(f"idle requests per minute per RayService: baseline {baseline.per_minute:.2f}, operator "
          f"{ours.per_minute:.2f} (ratio {ratio:.3f}x); wall time {time.perf_counter() - started:.1f} s")
    print(f"headline: idle API requests per minute per RayService = {ours.per_minute:.2f} (target <= 2)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

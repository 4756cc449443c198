"""Benchmark: 200 ModelDeployments applied at once against the emulated API server.

Measures the time until every ModelDeployment is Placed (for its current generation) and the
RayService holds the final serve config (gateway + 200 apps), and counts serveConfigV2 patches and
status writes. Baseline, same run and machine: the same operator with the debounce switched off
(`debounce_seconds=0`: a pass per wake-up, the closest this design gets to per-object reconciling).
The last line is the headline.

    .venv/bin/python bench/reconcile.py [--models 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "operator")]

from kube_emulator import RAY_SERVICE, KubeEmulator  # noqa: E402
from operator_harness import MD_TYPE, Cluster, OperatorThread, model_deployment, ray_service  # noqa: E402

SIZES_GIB = (2, 5, 10, 20, 40)


def run_once(models: int, debounce: float) -> dict[str, float]:
    emulator = KubeEmulator([MD_TYPE])  # TLS, the operator's token and the chart's RBAC, as in the tests
    emulator.start()
    try:
        emulator.create_sync({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ml"}})
        emulator.create_sync(ray_service(groups=(("gpu", 8, 8, "80Gi"),)))
        cluster = Cluster(emulator, Path(tempfile.mkdtemp(prefix="bench-reconcile-")))
        operator = OperatorThread(cluster, debounce_seconds=debounce, resync_seconds=30.0).start()
        try:
            started = time.perf_counter()
            for i in range(models):
                emulator.create_sync(model_deployment(f"m{i:03d}", f"org/m{i:03d}-{SIZES_GIB[i % 5]}g"))
            created = time.perf_counter() - started
            while True:
                items = emulator.list_sync(MD_TYPE)
                done = sum(1 for o in items if _placed(o))
                service = emulator.get_sync(RAY_SERVICE, "ml", "ndif") or {}
                text = service.get("spec", {}).get("serveConfigV2") or "{}"
                apps = len(json.loads(text).get("applications", []))
                if done == models and apps == models + 1:
                    break
                if time.perf_counter() - started > 300:
                    raise SystemExit(f"timed out: {done}/{models} placed, {apps} apps")
                time.sleep(0.05)
            elapsed = time.perf_counter() - started
        finally:
            operator.stop()
        patches = len([e for e in emulator.requests("PATCH", r"/rayservices/ndif$") if e.status == 200])
        writes = len(emulator.requests("PATCH", r"/modeldeployments/[^/]+/status$"))
        return {"seconds": elapsed, "create_seconds": created, "patches": patches, "status_writes": writes}
    finally:
        emulator.stop()


def _placed(obj: dict[str, object]) -> bool:
    status = obj.get("status") or {}
    assert isinstance(status, dict)
    meta = obj["metadata"]
    assert isinstance(meta, dict)
    placed = next((c for c in status.get("conditions", []) if c["type"] == "Placed"), {})
    return placed.get("status") == "True" and status.get("observedGeneration") == meta.get("generation")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=200)
    args = parser.parse_args()
    run_once(10, debounce=0.0)  # warm-up: imports and first-use costs hit neither measured run
    baseline = run_once(args.models, debounce=0.0)
    ours = run_once(args.models, debounce=0.5)
    for label, result in (("baseline (no debounce)", baseline), ("debounced (0.5 s)", ours)):
        print(f"{label:24s} all placed + final config in {result['seconds']:.2f} s "
              f"(creates took {result['create_seconds']:.2f} s), RayService patches {result['patches']:.0f}, "
              f"status writes {result['status_writes']:.0f}")
    print(f"ratios debounced/baseline: time {ours['seconds'] / baseline['seconds']:.2f}x, "
          f"patches {ours['patches'] / max(1, baseline['patches']):.2f}x")
    print(f"HEADLINE: {args.models} ModelDeployments applied at once -> all Placed and final serveConfigV2 in "
          f"{ours['seconds']:.2f} s with {ours['patches']:.0f} RayService patches "
          f"(baseline without debounce: {baseline['seconds']:.2f} s, {baseline['patches']:.0f} patches)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

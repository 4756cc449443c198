"""Pinned vs unpinned placement of one tight plan on a real two-node Ray cluster (declared GPUs).

    PYTHONPATH=. python bench/placement_on_ray.py [--orders all-at-once,one-by-one,reversed-rapid]

The project's planner makes a plan using ~99 % of 2 x 8 x 80 GiB GPUs (TP=4, TP=2 and shared
single-GPU replicas); its renderer renders it pinned and unpinned; trivial `num_cpus: 0` replicas
stand in for models (they start their TP ranks in their placement-group bundles). For each
deployment order: replicas RUNNING, and GPUs whose held set (deployment, share per rank) equals
the plan's. The pinned run ends with a redeploy that moves one model. Same cluster, same run.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.placement import on_ray


def main() -> None:
    # SIGTERM unwinds like Ctrl-C, so the cluster is stopped by the `with` below.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", default=",".join(on_ray.ORDERS))
    args = parser.parse_args()
    orders = [o for o in args.orders.split(",") if o]
    the_plan = on_ray.tight_plan()
    print(f"plan: {sum(d.replicas for d in the_plan.decisions)} replicas, "
          f"{on_ray.utilisation(the_plan):.1%} of {on_ray.PODS * on_ray.GPUS} GPUs reserved", flush=True)
    started = time.monotonic()
    with on_ray.two_node_cluster(log=print) as cluster:
        pinned = on_ray.run_orders(cluster, the_plan, pinned=True, orders=orders, timeout=600, log=print)
        second, what = on_ray.moved_plan(the_plan)
        moved = on_ray.redeploy(cluster, second, pinned=True, timeout=600)
        print(f"pinned redeploy ({what}): {moved.line()}", flush=True)
        unpinned = on_ray.run_orders(cluster, the_plan, pinned=False, orders=orders, timeout=600, log=print)
        for outcome in unpinned.values():
            for line in outcome.pending[:3]:
                print(f"  unpinned, unschedulable: {line}")
    print(f"elapsed {time.monotonic() - started:.0f} s")
    worst_pinned = min([*pinned.values(), moved], key=lambda o: (o.running, o.gpus_as_planned))
    worst_unpinned = min(unpinned.values(), key=lambda o: (o.running, o.gpus_as_planned))
    print(f"headline: pinned: {worst_pinned.line()}; unpinned: {worst_unpinned.line()}")


if __name__ == "__main__":
    main()

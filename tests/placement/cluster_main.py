"""Run a two-node Ray cluster on 127.0.0.1 until SIGTERM: `python -m tests.placement.cluster_main SPEC_JSON`.

Two real raylets (each its own processes, resources and labels) through `ray.cluster_utils.Cluster`
in this process, which keeps every address on loopback (`ray start` refuses a second node on one
machine unless it may use the machine's routable address). Prints READY once both nodes are up.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from typing import Any


def _keep_the_shared_address_file_alone() -> None:
    """`Cluster` records its address in /tmp/ray/ray_current_cluster (and deletes that file on
    shutdown), where any `ray.init()` on this machine would find it and join this cluster instead
    of starting its own. Others run Ray here too: this cluster is reached by its explicit address."""
    import ray._common.utils
    import ray._private.utils

    ray._private.utils.write_ray_address = lambda *args, **kwargs: None
    ray._common.utils.reset_ray_address = lambda *args, **kwargs: None


def main(spec: dict[str, Any]) -> None:
    _keep_the_shared_address_file_alone()
    from ray.cluster_utils import Cluster

    common = {"node_ip_address": "127.0.0.1", "num_cpus": spec["num_cpus"], "num_gpus": spec["num_gpus"],
              "object_store_memory": spec["object_store_bytes"], "temp_dir": spec["temp_dir"]}
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    cluster = Cluster(initialize_head=False, shutdown_at_exit=True)
    try:
        for index, node in enumerate(spec["nodes"]):
            extra: dict[str, Any] = {"resources": node["resources"], "labels": node["labels"]}
            if index == 0:
                extra.update(gcs_server_port=spec["gcs_port"], include_dashboard=True, dashboard_host="127.0.0.1",
                             dashboard_port=spec["dashboard_port"],
                             dashboard_agent_listen_port=spec["agent_port"])
            cluster.add_node(**common, **extra)
        print("READY", flush=True)
        stop.wait()
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))

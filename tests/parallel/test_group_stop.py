"""After a stop the ranks leave their process group and rebuild it (two gloo ranks).

Rank 1 is left blocked in a collective rank 0 never enters, as when a stop lands mid-forward:
rank 0 leaves the group and releases it (`release_blocked_peers`), rank 1's collective fails at
once instead of waiting out the collective timeout, and both rebuild the group. The model's
device mesh keeps working over the new group, and the collective counts agree again."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import torch
from loopback import free_port


def _rank_main(rank: int, ports: tuple[int, int], out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from model_runtime.replica.parallel.group import (
        collectives_issued,
        join_group,
        leave_group,
        rejoin_group,
        release_blocked_peers,
        tcp_store,
    )

    def store(port: int) -> object:
        return tcp_store("127.0.0.1", port, 2, is_master=True, wait_for_workers=False) if rank == 0 else None

    join_group(rank, 2, ports[0], "cpu", store=store(ports[0]))
    mesh = init_device_mesh("cpu", (2,))
    sharded = distribute_tensor(torch.arange(4.0), mesh, [Shard(0)])
    sharded.full_tensor()
    report: dict[str, object] = {}
    if rank == 1:  # blocked in a collective rank 0 never enters
        started = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1))
            report["blocked"] = "returned"
        except RuntimeError as exc:
            report["blocked"] = str(exc)[:200]
        report["freed_after_s"] = time.monotonic() - started
        report["issued_before"] = collectives_issued()
        leave_group()
    else:
        time.sleep(1.0)  # rank 0's stopped request ended in Python
        report["issued_before"] = collectives_issued()
        leave_group()
        report["released"] = release_blocked_peers()
    rejoin_group(rank, 2, ports[1], "cpu", store=store(ports[1]))
    report["whole"] = sharded.full_tensor().tolist()  # the old mesh, over the new group
    report["issued_after"] = collectives_issued()
    torch.save(report, f"{out}.{rank}")


@pytest.mark.slow
def test_a_rank_blocked_by_a_stop_is_released_and_the_group_rebuilt(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    ports = (free_port(), free_port())
    procs = [context.Process(target=_rank_main, args=(rank, ports, str(tmp_path / "r"))) for rank in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0, f"rank process ended with {proc.exitcode}"
    first, second = (torch.load(f"{tmp_path / 'r'}.{rank}") for rank in range(2))
    assert int(first["released"]) >= 1
    assert "closed" in str(second["blocked"]).lower(), second["blocked"]
    assert float(second["freed_after_s"]) < 30  # not the 120 s collective timeout
    assert second["issued_before"] == first["issued_before"] + 1  # out of step before the rebuild
    assert first["whole"] == second["whole"] == [0.0, 1.0, 2.0, 3.0]
    assert first["issued_after"] == second["issued_after"]  # in step after it

"""The process group of a tensor-parallel replica: join it, tell whether the ranks are in step,
and build it anew after a stop.

    store = open_store(world)                 # rank 0: a TCPStore on a free loopback port
    join_group(rank, world, store.port, device, store=store if rank == 0 else None)
    collectives_issued()                      # this rank's count of collectives on the group
    leave_group()                             # after a stop, once this rank's request ended
    rejoin_group(rank, world, port, device)   # every rank: a fresh group on a fresh store

Why a stop rebuilds the group: a timeout stops each rank's request at its own point. A rank
stopped before collective N can leave N pending in a peer's queue (an asynchronous collective),
where it would pair with the next request's first collective and shift every later one. So after
a stop every rank leaves the group once its request has ended (abort, destroy) and the ranks join
a new group on a new store. The new default group takes the old one's name, so the model's
device mesh (and every DTensor weight on it) keeps working without a reload. Whether the ranks
are in step is read off the group's own count of collectives issued, compared across ranks after
every request.

Not mended here: a rank blocked inside a collective its peer never enters (a synchronous
all-reduce the peer was stopped just before). gloo's abort and destroy leave the connections
open, so that rank stays in native code, which no stop reaches, until the collective timeout: its
request cannot be stopped and the replica is replaced, as a single-device replica is when a
request is stuck in native code.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

from model_runtime.settings import RuntimeSettings


def tcp_store(*args: Any, **kwargs: Any) -> Any:
    """torch's TCPStore (not in torch.distributed's typed exports), on its own socket threads.

    Not on libuv: libuv sets up io_uring rings, which the replica's process filter refuses once the
    model is loaded (sandbox/process_filter.py); the libuv store then aborted the process at its
    next `io_uring_enter`, and UV_USE_IO_URING=0 did not stop it."""
    import torch.distributed

    distributed: Any = torch.distributed
    return distributed.TCPStore(*args, use_libuv=False, **kwargs)


def collective_timeout_s() -> float:
    return RuntimeSettings.from_env().tp_collective_timeout_s


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=collective_timeout_s())


def master_addr() -> str:
    # All ranks of a replica share one node (STRICT_PACK): by default they meet on its loopback.
    return RuntimeSettings.from_env().tp_master_addr


def open_store(world: int) -> Any:
    """Rank 0's store for a new group, on port 0: the kernel picks a free port, so replicas on one
    node never collide (rank 0 keeps it alive for the group's lifetime)."""

    return tcp_store(master_addr(), 0, world, is_master=True, wait_for_workers=False, timeout=_timeout())


def join_group(rank: int, world: int, port: int, device: str, store: Any = None) -> None:
    """Join the replica's process group (rank 0 passes the store it opened)."""
    import torch.distributed as dist

    backend = "nccl" if device == "cuda" else "gloo"
    if backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # peers are on this node: stay on loopback
    # transformers reads these when it builds its device mesh; each rank sees only its own GPU.
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0"})
    if store is None:
        store = tcp_store(master_addr(), port, world, is_master=False, timeout=_timeout())
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=_timeout())
    if backend == "nccl":
        # The communicator is made at its first collective and opens /dev/shm segments then: make it
        # now, while the process may still open files for writing (sandbox/process_filter.py).
        import torch

        dist.all_reduce(torch.zeros(1, device="cuda"))


def collectives_issued() -> int:
    """How many collectives this rank has issued on the group since it was (re)built."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return -1
    return int(dist.group.WORLD._get_sequence_number_for_group())  # type: ignore[union-attr]


def leave_group() -> None:
    """Abort and destroy this rank's group (idempotent); call it once this rank's request ended."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        dist.group.WORLD.abort()  # type: ignore[union-attr]
    except Exception:  # already aborted, or a backend without abort: destroying it still follows
        pass
    dist.destroy_process_group()


def rejoin_group(rank: int, world: int, port: int, device: str, store: Any = None) -> None:
    """Leave the (aborted) group and join a new one on `port`; every rank calls it together.

    Ends with one all-reduce, so a rank returns only once the new group carries data."""
    import torch
    import torch.distributed as dist

    leave_group()
    join_group(rank, world, port, device, store=store)
    probe = torch.ones(1, device=device)
    dist.all_reduce(probe)
    if int(probe.item()) != world:
        raise RuntimeError(f"the rebuilt process group summed {probe.item()} over {world} ranks")

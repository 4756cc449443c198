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

A rank blocked inside a collective its peer never enters (a synchronous all-reduce the peer was
stopped just before) is not freed by gloo's abort or destroy: they leave the connections open.
`release_blocked_peers` half-closes them from the side that left, and the blocked collective
fails at once.
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
    before = _tcp_sockets()
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=_timeout())
    _record_pair_ports(store, rank, world, before)
    if backend == "nccl":
        # The communicator is made at its first collective and opens /dev/shm segments then: make it
        # now, while the process may still open files for writing (sandbox/process_filter.py).
        import torch

        dist.all_reduce(torch.zeros(1, device="cuda"))


# This rank's side of the group's pair connections: its gloo listening ports (pairs accepted
# there) and the peers' (pairs it connected to). Ray's own connections match neither.
_PAIR_PORTS: dict[str, set[int]] = {"mine": set(), "peers": set()}


def _tcp_sockets() -> dict[int, tuple[int, int | None, bool]]:
    """This process's TCP sockets: fd → (local port, remote port or None, listening)."""
    import socket

    found: dict[int, tuple[int, int | None, bool]] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return found
    for name in names:
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:["):
                continue
            with socket.socket(fileno=os.dup(int(name))) as sock:
                if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
                    continue
                listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
                try:
                    remote: int | None = int(sock.getpeername()[1])
                except OSError:
                    remote = None
                found[int(name)] = (int(sock.getsockname()[1]), remote, listening)
        except OSError:
            continue
    return found


def _record_pair_ports(store: Any, rank: int, world: int, before: dict[int, tuple[int, int | None, bool]]) -> None:
    """gloo listens on new ports while the group is built: publish this rank's through the group's
    store and read the peers', so `release_blocked_peers` can tell gloo's pairs from Ray's."""
    mine = {local for fd, (local, _, listening) in _tcp_sockets().items() if listening and fd not in before}
    store.set(f"ndif-gloo-listen/{rank}", ",".join(map(str, sorted(mine))))
    peers: set[int] = set()
    for other in range(world):
        if other != rank:
            text = store.get(f"ndif-gloo-listen/{other}").decode()
            peers.update(int(p) for p in text.split(",") if p)
    _PAIR_PORTS["mine"], _PAIR_PORTS["peers"] = mine, peers


def release_blocked_peers() -> int:
    """Half-close (FIN) this rank's pair connections of the group it left; returns how many.

    A peer blocked in a collective this rank never entered waits on one of them; gloo's abort and
    destroy leave them open, so without this it waits out the collective timeout. Only for peers
    known to be blocked: a peer that is idle and has not aborted its own group takes the FIN as a
    fatal error (gloo terminates the process), and a full shutdown ends this process likewise."""
    import socket

    mine, peers = _PAIR_PORTS["mine"], _PAIR_PORTS["peers"]
    released = 0
    for fd, (local, remote, listening) in _tcp_sockets().items():
        if listening or remote is None or not (local in mine or remote in peers):
            continue
        try:
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_WR)
            released += 1
        except OSError:
            pass
    _PAIR_PORTS["mine"], _PAIR_PORTS["peers"] = set(), set()
    return released


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

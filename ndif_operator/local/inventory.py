"""This machine as a planner inventory: its GPUs if it has any, otherwise its RAM as one device.

A GPU machine becomes one worker group with one pod whose GPUs are this machine's GPUs. A CPU-only
machine becomes a group with one pseudo-device whose memory is a share of host RAM, so that the
planner places HOT models exactly as it would on a GPU; the local renderer step then asks Ray for
no GPU at all (`cpu_only`). The GPU query shells out to `nvidia-smi`: no torch in the operator.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ndif_operator.api.v1alpha1 import GIB
from ndif_operator.planning import Inventory, WorkerGroup

LOCAL_GROUP = "local"
# The Ray head, Serve controller/proxy and the gateway replica live in RAM next to the models.
DEFAULT_RESERVED_BYTES = 3 * GIB


@dataclass(frozen=True)
class Machine:
    """What the inventory is built from (detected, or given by tests and flags)."""

    gpu_memory_bytes: tuple[int, ...]  # one entry per GPU
    host_memory_bytes: int


@dataclass(frozen=True)
class LocalInventory:
    inventory: Inventory
    cpu_only: bool  # True: the single "GPU" is host RAM; replicas must request no GPU from Ray

    @property
    def gpus(self) -> int:
        return 0 if self.cpu_only else self.inventory.total_gpus


def build_inventory(machine: Machine, *, reserved_bytes: int = DEFAULT_RESERVED_BYTES) -> LocalInventory:
    """Pure: the inventory of `machine` after `reserved_bytes` of RAM for Ray and the gateway."""
    usable = machine.host_memory_bytes - reserved_bytes
    if usable <= 0:
        raise ValueError(
            f"host memory {machine.host_memory_bytes / GIB:.1f} GiB leaves nothing after "
            f"{reserved_bytes / GIB:.1f} GiB reserved for Ray; lower --reserved-memory"
        )
    if machine.gpu_memory_bytes:
        group = WorkerGroup(
            name=LOCAL_GROUP,
            pods=1,
            gpus_per_pod=len(machine.gpu_memory_bytes),
            # The planner assumes identical GPUs per group; the smallest one is the safe size.
            gpu_memory_bytes=min(machine.gpu_memory_bytes),
            cpu_memory_bytes=usable,
        )
        return LocalInventory(Inventory(groups=(group,)), cpu_only=False)
    # Half of RAM serves HOT models, half holds WARM copies: both draw on the same memory.
    group = WorkerGroup(
        name=LOCAL_GROUP,
        pods=1,
        gpus_per_pod=1,
        gpu_memory_bytes=usable // 2,
        cpu_memory_bytes=usable - usable // 2,
    )
    return LocalInventory(Inventory(groups=(group,)), cpu_only=True)


def parse_meminfo(text: str) -> int:
    """MemTotal in bytes from /proc/meminfo text."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            return int(parts[1]) * 1024
    raise ValueError("MemTotal missing from /proc/meminfo")


def parse_nvidia_smi(text: str) -> tuple[int, ...]:
    """GPU memory in bytes from `nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits` (MiB)."""
    return tuple(int(float(line.strip())) * 1024**2 for line in text.splitlines() if line.strip())


def detect_machine(meminfo: Path = Path("/proc/meminfo")) -> Machine:
    gpus: tuple[int, ...] = ()
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=20, check=True,
            ).stdout  # fmt: skip
            gpus = parse_nvidia_smi(out)
        except (subprocess.SubprocessError, OSError, ValueError):
            gpus = ()  # a broken driver means no usable GPU, not a crash
    return Machine(gpu_memory_bytes=gpus, host_memory_bytes=parse_meminfo(meminfo.read_text()))

"""Knobs of the renderer that are cluster-wide rather than per model."""

from __future__ import annotations

from dataclasses import dataclass, field

from ndif_operator.api import GatewayAppArgs


@dataclass(frozen=True, slots=True)
class RenderOptions:
    """How the plan becomes Serve config.

    `cpu_only` renders HOT replicas with `num_gpus: 0` (local mode and CPU test clusters): the plan
    still decides the level, but no GPU is requested from Ray. `replica_num_cpus` of None leaves
    Serve's default (1); local mode and tests pass 0 so replicas never wait for a CPU on a 2-core
    box. `gateway_num_cpus` of None is 0: the gateway is pinned to Ray's head node, which a cluster
    starts with no CPU to hand out so that model replicas stay off it.
    """

    cpu_only: bool = False
    pin_gpus: bool = True
    replica_num_cpus: float | None = None
    gateway_num_cpus: float | None = None
    gateway_replicas: int = 1
    gateway: GatewayAppArgs = field(default_factory=GatewayAppArgs)
    # Extra `ray_actor_options.memory` for a HOT replica's host-side process (tokenizer, nnsight
    # graph, results) on top of nothing: the weights live on the GPU. 0 leaves memory unreserved.
    hot_host_memory_bytes: int = 0
    # `http_options` of the Serve config; None leaves KubeRay's/Serve's defaults.
    http_host: str | None = None
    http_port: int | None = None
    # `runtime_env.env_vars` every model replica gets (e.g. OMP_NUM_THREADS on CPU nodes).
    replica_env: tuple[tuple[str, str], ...] = ()
    # Serve's `logging_config.encoding` for every Serve component ("JSON" or "TEXT"); None: Serve's default.
    log_encoding: str | None = None

    def __post_init__(self) -> None:
        for name in ("replica_num_cpus", "gateway_num_cpus"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.gateway_replicas < 1:
            raise ValueError(f"gateway_replicas must be >= 1, got {self.gateway_replicas}")
        if self.hot_host_memory_bytes < 0:
            raise ValueError("hot_host_memory_bytes must be >= 0")

"""The typed `args` and `user_config` of the Ray Serve applications the operator renders.

One schema, shared: the operator renders these into `serveConfigV2`, the runtime's
`build_app(args)` validates them with the very same models. Pure pydantic, so the runtime may
import it without pulling in kopf or the Kubernetes client (an import-linter contract checks).

What goes where: a change of `args` or
`ray_actor_options` restarts replicas (a model reload); `user_config` is applied in place by
`reconfigure()`. So model identity and placement are args; limits are user_config. The gateway's
routing table is its user_config too: adding or removing a model must not restart the gateway,
whose sessions and jobs live in its memory.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ndif_operator.api.v1alpha1 import MIB, DType, Level, ModelSource, RuntimeLimits


class _Args(BaseModel):
    # snake_case on the wire: Ray Serve's own config is snake_case.
    model_config = ConfigDict(extra="forbid", use_enum_values=True)


class ModelUserConfig(_Args):
    """Knobs a model replica takes without a restart (Serve `user_config` → `reconfigure`)."""

    level: Level = Level.HOT
    request_timeout_seconds: int = 300
    max_payload_bytes: int = 64 * MIB
    max_result_bytes: int = 1024 * MIB
    max_queue_depth: int = 64
    # The largest batch and longest sequence the memory budget is sized for (enforced per request).
    max_batch_size: int = 8
    max_sequence_length: int = 2048
    # A request while WARM asks for HOT (ModelDeployment `activateOnRequest`); see the gateway.
    activate_on_request: bool = False
    # The pinned GPU share (`{ndif_gpu_<i>: share}`) a HOT single-GPU replica holds through a
    # placement group on its own node instead of through `ray_actor_options`: WARM and HOT then
    # render the same options, and the level change is a `reconfigure` (docs/runtime.md).
    gpu_lease: dict[str, float] = Field(default_factory=dict)

    @classmethod
    def from_limits(
        cls, limits: RuntimeLimits, level: Level, *, activate_on_request: bool = False
    ) -> ModelUserConfig:
        return cls(
            level=level,
            activate_on_request=activate_on_request,
            request_timeout_seconds=limits.request_timeout_seconds,
            max_payload_bytes=limits.max_payload_bytes,
            max_result_bytes=limits.max_result_bytes,
            max_queue_depth=limits.max_queue_depth,
            max_batch_size=limits.max_batch_size,
            max_sequence_length=limits.max_sequence_length,
        )


class ModelAppArgs(_Args):
    """`args` of one model application (`import_path: model_runtime.replica.app:build_app`)."""

    model_key: str = Field(description="The key nnsight clients send (`repo_id`, lower-cased).")
    deployment: str = Field(description="`namespace/name` of the ModelDeployment.")
    repo_id: str
    revision: str = "main"
    source: ModelSource
    dtype: DType = DType.BFLOAT16
    trust_remote_code: bool = False
    tensor_parallel_size: int = Field(default=1, ge=1)
    gpus_per_replica: float = Field(default=0.0, ge=0, description="0 on CPU-only clusters.")
    gpu_fraction: float = Field(
        default=0.0, ge=0, le=1, description="Share of each GPU one rank may use (caps its CUDA allocator)."
    )


class GatewayRoute(_Args):
    """One ModelDeployment as the gateway routes to it (an entry of `GatewayUserConfig.models`)."""

    deployment: str = Field(description="`namespace/name` of the ModelDeployment.")
    level: Level = Field(description="The granted level; COLD models have no application.")
    app: str | None = Field(default=None, description="Serve application name; None when COLD.")
    apps: list[str] = Field(default_factory=list, description="Every application serving the model: one per "
                            "pinned replica slot (the first is `app`); empty when COLD.")
    repo_id: str = ""
    revision: str = "main"
    # ModelDeployment `activateOnRequest`: a request for a WARM/COLD model records the demand.
    activate_on_request: bool = False


class GatewayUserConfig(_Args):
    """The gateway's `user_config`: the routing table, applied in place by `reconfigure`."""

    models: dict[str, GatewayRoute] = Field(
        default_factory=dict, description="model_key → route, for every ModelDeployment (COLD included)."
    )


class GatewayAppArgs(_Args):
    """`args` of the gateway application (the nnsight ingress): only what needs a restart."""

    models: dict[str, str] = Field(
        default_factory=dict,
        description="Deprecated static routes (model_key → application name); the renderer leaves this "
        "empty and routes through `GatewayUserConfig`, whose entries win.",
    )
    min_nnsight_version: str = "0.8.1"
    api_key_hashes_env: str = Field(
        default="NDIF_API_KEY_HASHES",
        description="Env var holding comma-separated sha256 hex digests of accepted API keys.",
    )
    api_key_hashes_dir: str | None = Field(
        default=None,
        description="Directory of accepted API-key sha256 digests, one per file (a mounted Secret); re-read "
        "when it changes, so keys rotate without a restart. Adds to `api_key_hashes_env`.",
    )
    object_store_bucket: str | None = None
    object_store_endpoint_url: str | None = None
    direct_port: int | None = Field(
        default=None, ge=1, le=65535,
        description="The gateway replica's own HTTP/websocket listener (users' door, no Serve proxy hop), on this "
        "fixed port of its node; it survives the replica being replaced. None: only Serve's proxy serves the gateway.",
    )
    direct_host: str = Field(default="0.0.0.0", min_length=1, description="Address the direct listener binds.")
    inline_result_max_bytes: int = 4 * MIB
    max_request_bytes: int = Field(
        default=256 * MIB, ge=1,
        description="Bodies above this are refused while they stream in (chunked ones included), before parsing; "
        "raise it with the models' `maxPayloadBytes`.",
    )

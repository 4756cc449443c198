"""`ModelDeployment` (ndif.dev/v1alpha1): the single source of truth of the API.

The CRD in `crds/` is generated from these models (`make generate`; a test fails on drift). CEL
rules that the API server enforces live next to the field they guard, in `json_schema_extra`, so
that the schema, the rules and the Python types never disagree. Field names are camelCase on the
wire (Kubernetes convention) and snake_case in Python.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue
from pydantic.alias_generators import to_camel

from ndif_operator.api.conditions import ConditionStatus
from ndif_operator.api.parallel import ParallelShape

GROUP = "ndif.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SINGULAR = "modeldeployment"
SHORT_NAMES = ("md",)
CRD_NAME = f"{PLURAL}.{GROUP}"

GIB = 1024**3
MIB = 1024**2

TENSOR_PARALLEL_SIZES = (1, 2, 4, 8)


def _cel(rule: str, message: str, **extra: str) -> dict[str, JsonValue]:
    """One `x-kubernetes-validations` entry (standard CEL only: cel-python evaluates it offline)."""
    return {"rule": rule, "message": message, **extra}


class _Model(BaseModel):
    """Base for every API object: camelCase on the wire, strict about unknown fields."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        serialize_by_alias=True,
    )


class Level(StrEnum):
    """Where a model's weights live. HOT: on GPUs, serving. WARM: in CPU RAM, a reload away from
    HOT without reading disk. COLD: on disk or in the object store only."""

    HOT = "Hot"
    WARM = "Warm"
    COLD = "Cold"


class DType(StrEnum):
    AUTO = "auto"  # the checkpoint's own dtype
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


# --- spec -----------------------------------------------------------------------------------


class HuggingFaceSource(_Model):
    """Download from the Hugging Face Hub (or read the node's HF cache when offline)."""

    endpoint: str | None = Field(
        default=None, description="Hub endpoint (e.g. a mirror). Default: the public Hub."
    )
    token_secret: str | None = Field(
        default=None, description="Name of a Secret (key `token`) with a Hub token for gated models."
    )


class LocalPathSource(_Model):
    """A directory that is present on every node that may host the model (e.g. a PVC mount)."""

    path: str = Field(
        min_length=1,
        pattern=r"^/",
        description="Absolute path of the checkpoint directory on the node.",
    )


class S3Source(_Model):
    """An S3 (or S3-compatible) bucket and prefix holding the checkpoint files."""

    bucket: str = Field(min_length=3, max_length=63, description="Bucket name.")
    prefix: str = Field(default="", description="Key prefix of the checkpoint files.")
    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (MinIO, Ceph ...).")
    region: str | None = Field(default=None, description="Bucket region.")
    credentials_secret: str | None = Field(
        default=None,
        description="Secret (in the operator's namespace) with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY with which "
        "the operator reads the checkpoint's headers to size it; default: the operator's identity. Model replicas "
        "load with the read-only keys mounted on the Ray workers (chart value rayService.weightsCredentialsSecret).",
    )


class ModelSource(_Model):
    """Where the checkpoint comes from: exactly one of `huggingFace`, `localPath`, `s3`."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "(has(self.huggingFace) ? 1 : 0) + (has(self.localPath) ? 1 : 0)"
                    " + (has(self.s3) ? 1 : 0) == 1",
                    "source must set exactly one of huggingFace, localPath, s3",
                    reason="FieldValueInvalid",
                )
            ]
        }
    )

    hugging_face: HuggingFaceSource | None = None
    local_path: LocalPathSource | None = None
    s3: S3Source | None = None

    @property
    def kind(self) -> Literal["huggingFace", "localPath", "s3"]:
        if self.local_path is not None:
            return "localPath"
        if self.s3 is not None:
            return "s3"
        return "huggingFace"


class ModelSpec(_Model):
    """Which checkpoint to serve, and how to load it."""

    repo_id: str = Field(
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$",
        description="Hugging Face style id (`org/name`); the key users trace against. Immutable.",
        json_schema_extra={"x-kubernetes-validations": [_cel("self == oldSelf", "repoId is immutable")]},
    )
    revision: str = Field(default="main", min_length=1, description="Branch, tag or commit of the checkpoint.")
    source: ModelSource = Field(
        default_factory=lambda: ModelSource(hugging_face=HuggingFaceSource()),
        description="Where the weights are read from. Default: the Hugging Face Hub.",
        json_schema_extra={"default": {"huggingFace": {}}},
    )
    dtype: DType = Field(default=DType.BFLOAT16, description="Dtype the weights are loaded in.")
    trust_remote_code: bool = Field(
        default=False, description="Allow the checkpoint's own modelling code (runs in the runtime)."
    )


class Autoscaling(_Model):
    """Serve autoscaling bounds; when set, `replicas` is the initial count."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "self.minReplicas <= self.maxReplicas",
                    "autoscaling.minReplicas must not exceed autoscaling.maxReplicas",
                )
            ]
        }
    )

    min_replicas: int = Field(default=1, ge=0, le=64)
    max_replicas: int = Field(default=1, ge=1, le=64)
    target_ongoing_requests: float = Field(default=2.0, ge=0.1, le=1000.0)


class RuntimeLimits(_Model):
    """Per-model limits the runtime enforces on each request; changing them restarts nothing."""

    request_timeout_seconds: int = Field(default=300, ge=1, le=86400)
    max_payload_bytes: int = Field(default=64 * MIB, ge=1024, le=4 * GIB)
    max_result_bytes: int = Field(default=1 * GIB, ge=1024, le=64 * GIB)
    max_queue_depth: int = Field(default=64, ge=1, le=100000, description="Queued requests beyond this are refused.")
    max_batch_size: int = Field(
        default=8, ge=1, le=4096, description="Largest batch the memory budget is sized for."
    )
    max_sequence_length: int = Field(
        default=2048, ge=1, le=1048576, description="Longest sequence the memory budget is sized for."
    )


TensorParallelSize = Annotated[
    int | Literal["auto"],
    Field(
        description="GPUs one replica spans (1, 2, 4, 8) or `auto` (the fewest that fit the model).",
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "type(self) == string ? self == 'auto' : self in [1, 2, 4, 8]",
                    "tensorParallelSize must be 1, 2, 4, 8 or 'auto'",
                )
            ]
        },
    ),
]


class ModelDeploymentSpec(_Model):
    """What a cluster admin asks for."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "!self.dedicated || self.level == 'Hot'",
                    "a dedicated model must have level Hot",
                    fieldPath=".dedicated",
                ),
                _cel(
                    "!has(self.autoscaling) || (self.replicas >= self.autoscaling.minReplicas"
                    " && self.replicas <= self.autoscaling.maxReplicas)",
                    "replicas must lie within autoscaling.minReplicas..maxReplicas",
                    fieldPath=".replicas",
                ),
            ]
        }
    )

    model: ModelSpec
    level: Level = Field(default=Level.HOT, description="Desired level: Hot (GPU), Warm (CPU RAM), Cold (disk).")
    replicas: int = Field(default=1, ge=0, le=64, description="Serve replicas while Hot.")
    autoscaling: Autoscaling | None = None
    tensor_parallel_size: TensorParallelSize = 1
    priority: int = Field(
        default=0, ge=-1000, le=1000, description="Higher is placed first and evicted last."
    )
    dedicated: bool = Field(default=False, description="Never evicted; placed before any other model.")
    minimum_deployment_seconds: int = Field(
        default=0,
        ge=0,
        le=7 * 86400,
        description="Once Hot, not evicted for equal or lower priority before this many seconds.",
    )
    activate_on_request: bool = Field(
        default=False, description="A request for this model while Warm asks the operator to make it Hot."
    )
    ray_service: str | None = Field(
        default=None,
        max_length=63,
        description="Name of the target RayService in this namespace; default: the operator's setting.",
    )
    # `default: {}` in the schema lets the API server fill the nested defaults when omitted.
    limits: RuntimeLimits = Field(default_factory=RuntimeLimits, json_schema_extra={"default": {}})


# --- status ---------------------------------------------------------------------------------


class Condition(_Model):
    """metav1.Condition."""

    type: str
    status: ConditionStatus
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = ""
    last_transition_time: datetime
    observed_generation: int | None = None


class EstimateMethod(StrEnum):
    SAFETENSORS_HEADERS = "SafetensorsHeaders"  # exact, from file headers; no weights read
    META_DEVICE = "MetaDevice"  # instantiated on the meta device (runtime-side fallback)
    CONFIG = "Config"  # computed from config.json alone (approximate)
    CACHED = "Cached"  # a previous evaluation (the entry keeps its original method)


class RankEstimate(_Model):
    """GPU memory one rank of a tensor-parallel replica needs at one size."""

    tensor_parallel_size: int = Field(ge=1, le=8)
    bytes: int = Field(ge=0)


class Estimate(_Model):
    weights_bytes: int = Field(ge=0, description="Parameters and buffers in the requested dtype.")
    total_bytes: int = Field(
        ge=0, description="Weights plus runtime budget (KV cache, working memory, logits, saved values, context)."
    )
    ranks: list[RankEstimate] = Field(
        default_factory=list,
        max_length=4,
        description="GPU memory one rank needs at each tensorParallelSize: split weights, KV cache and"
        " heads divide by the size; replicated weights, gathered logits, saved values and each"
        " rank's CUDA context do not. Empty when the model's shape is unknown.",
    )
    attention: str = Field(default="", description="Attention implementation the budget is sized for (sdpa, eager).")
    total: str = Field(default="", description="totalBytes in human units (printer column).")
    method: str
    evaluated_at: datetime | None = None
    parallel: ParallelShape | None = Field(
        default=None, description="What decides the tensorParallelSize values this model allows."
    )


class Placement(_Model):
    worker_group: str
    gpus_per_replica: float = Field(
        ge=0,
        description="GPU share one replica holds: a fraction of one GPU, or tensorParallelSize * gpuFraction.",
    )
    gpu_fraction: float = Field(
        default=1.0, ge=0, le=1, description="Share of each GPU a replica (or each tensor-parallel rank) uses."
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs (ranks) one replica spans.")
    replicas: int = Field(default=0, ge=0)
    since: datetime | None = None


class ScheduledBooking(_Model):
    """A calendar booking of this model: dedicated Hot from `start` to `end`."""

    start: datetime
    end: datetime
    summary: str = ""
    schedule: str = Field(default="", description="The CalendarSchedule that holds the booking.")


class ModelSchedule(_Model):
    """What the calendar says about this model (see CalendarSchedule); absent when never booked."""

    booked_until: str = Field(
        default="", description="End of the booking in force (RFC 3339); empty when not booked now."
    )
    current: ScheduledBooking | None = None
    upcoming: list[ScheduledBooking] = Field(default_factory=list, description="Bookings in the week ahead.")
    conflict: str = Field(default="", description="Why a booking of this model cannot be honoured.")


class ModelDeploymentStatus(_Model):
    observed_generation: int | None = None
    level: Level | None = Field(default=None, description="The granted level.")
    phase: str | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    estimate: Estimate | None = None
    placement: Placement | None = None
    replicas: int = Field(default=0, ge=0, description="Replicas granted by the planner.")
    ready_replicas: int = Field(default=0, ge=0)
    message: str = ""
    activated_until: datetime | None = Field(
        default=None,
        description="activateOnRequest: Hot on request until then; in the past when the last activation ended.",
    )
    schedule: ModelSchedule | None = None


class ModelDeployment(_Model):
    """A whole object as the API server stores it."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["ndif.dev/v1alpha1"] = API_VERSION  # type: ignore[assignment]
    kind: Literal["ModelDeployment"] = KIND  # type: ignore[assignment]
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: ModelDeploymentSpec
    status: ModelDeploymentStatus | None = None

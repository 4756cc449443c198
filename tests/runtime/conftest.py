"""One local Ray + Serve for the runtime tests, a tiny model served by it, and a moto S3 server.

Expensive things are session-scoped: Ray start (~10 s) and each replica (~7 s of imports) are
paid once. Replicas take `num_cpus: 0` (2 shared cores; runtime-on-cpu.md snag 6).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loopback import free_port

from model_runtime.gateway.auth import key_digest
from model_runtime.replica.garbage import freeze_long_lived
from model_runtime.sandbox.capabilities import WEDGE_HOOK_ENV
from model_runtime.tiny_models import build_tiny_model
from ndif_operator.api.naming import GATEWAY_APP
from ndif_operator.api.pinning import gpu_resource
from ndif_operator.rendering.serve_config import MODEL_REPLICA_ENV
from runtime.conftest_names import MODEL_APP, SLOW_APP
from runtime.wire import API_KEY, API_KEY_HASHES_ENV, RESULTS_BUCKET, VICTIM_KEY, InfluxSink


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("models") / "tiny-llama")


# One pinned GPU resource, as a GPU node declares (api/pinning.py): the GPU lease test reserves it.
PINNED_GPU = gpu_resource(0)


@pytest.fixture(scope="session")
def serve_port() -> Iterator[int]:
    """A local Ray (auth off, loopback) with Serve's proxy on a free port; shut down at the end."""
    import ray
    from ray import serve

    os.environ[API_KEY_HASHES_ENV] = ""
    port = free_port()
    ray.init(
        address="local",  # a cluster of our own, never another session's head on this machine
        num_cpus=2,
        resources={PINNED_GPU: 1},
        include_dashboard=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def model_args(path: Path, deployment: str = "default/tiny-llama") -> dict[str, Any]:
    return {
        "model_key": str(path).lower(),
        "deployment": deployment,
        "repo_id": str(path),
        "source": {"local_path": {"path": str(path)}},
        "dtype": "float32",
    }


def model_target(name: str, args: dict[str, Any], user_config: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None, **options: Any) -> Any:
    from ray.serve.api import RunTarget

    from model_runtime.replica import app as model_app

    # What every rendered model replica carries (no uvloop: the direct channel's server runs on its loop).
    actor_options: dict[str, Any] = {"num_cpus": 0, "runtime_env": {"env_vars": {**MODEL_REPLICA_ENV, **(env or {})}}}
    app = model_app.ModelReplica.options(
        ray_actor_options=actor_options, user_config=user_config or {}, **options
    ).bind(args)
    return RunTarget(target=app, name=name, route_prefix=None)


def gateway_target(
    models: dict[str, str] | None = None,
    *,
    routes: dict[str, dict[str, Any]] | None = None,
    app_name: str = GATEWAY_APP,
    route_prefix: str = "/",
    env: dict[str, str] | None = None,
    **extra: Any,
) -> Any:
    """A gateway routing by `routes` (its user_config, as the renderer makes it) or by the
    deprecated static `models` in args."""
    from ray.serve.api import RunTarget

    from model_runtime.gateway import app as gateway_app

    args = {"models": models or {}, "api_key_hashes_env": API_KEY_HASHES_ENV, **extra}
    options: dict[str, Any] = {"num_cpus": 0}
    if env:
        options["runtime_env"] = {"env_vars": env}
    deployment = gateway_app.NnsightGateway.options(ray_actor_options=options)
    if routes is not None:
        deployment = deployment.options(user_config={"models": routes})
    return RunTarget(target=deployment.bind(args), name=app_name, route_prefix=route_prefix)


def route(app: str | None, level: str = "Hot", deployment: str = "default/x", **extra: Any) -> dict[str, Any]:
    return {"deployment": deployment, "level": level, "app": app, **extra}


STRICT_PREFIX = "/strict"
GHOST_KEY = "ghost/model"
COLD_KEY = "cold/model"


def main_routes(models: dict[str, str]) -> dict[str, dict[str, Any]]:
    deployments = {MODEL_APP: "default/tiny-llama", SLOW_APP: "default/tiny-slow"}
    table = {key: route(app, deployment=deployments[app], repo_id=key) for key, app in models.items()}
    table[GHOST_KEY] = route("md-default-ghost", deployment="default/ghost")
    table[COLD_KEY] = route(None, "Cold", deployment="default/cold", repo_id="Cold/Model")
    return table
# The second model: tight limits for timeout, backpressure, payload size and WARM/COLD tests.
SLOW_CONFIG = {
    "max_queue_depth": 1,
    "request_timeout_seconds": 3,
    "max_payload_bytes": 100_000,
    "activate_on_request": True,
    "max_batch_size": 1,  # the ModelDeployment's limits reach the sandbox (test_remote_research.py)
    "max_sequence_length": 64,
}


INFLUX_TOKEN = "influx-test-token"  # the strict gateway's; no model replica is given it


@pytest.fixture(scope="session")
def influx_sink() -> Iterator[InfluxSink]:
    """Where the strict gateway writes its InfluxDB points."""
    with InfluxSink() as sink:
        yield sink


@pytest.fixture(scope="session")
def served(serve_port: int, tiny_llama: Path, s3_endpoint: str, influx_sink: InfluxSink,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two tiny model apps, the open gateway at `/` and a strict one (API keys, S3 results,
    InfluxDB points) at /strict."""
    slow_path = build_tiny_model("llama", tmp_path_factory.mktemp("models") / "tiny-slow", seed=1)
    from ray import serve

    models = {str(tiny_llama).lower(): MODEL_APP, str(slow_path).lower(): SLOW_APP}
    door = free_port()  # the main gateway's own listener, as rendered: the same routes without Serve's proxy
    serve.run_many([  # all at once: replicas import torch/nnsight in parallel
        model_target(MODEL_APP, model_args(tiny_llama)),
        # Fast health checks: the wedged-replica test waits for Serve to replace the replica, and
        # wedges it through the test-only hook (one C call no stop reaches) enabled on this app only.
        model_target(SLOW_APP, model_args(slow_path, "default/tiny-slow"), SLOW_CONFIG,
                     env={WEDGE_HOOK_ENV: "1"}, health_check_period_s=1, health_check_timeout_s=10),
        # The routing table as user_config: "ghost/model" is routed to an app that was never deployed,
        # "cold/model" is COLD (routed, no app). The strict gateway keeps the static args routes.
        gateway_target(routes=main_routes(models), direct_port=door, direct_host="127.0.0.1"),
        gateway_target(
            models,
            app_name="gateway-strict",
            route_prefix=STRICT_PREFIX,
            env={
                API_KEY_HASHES_ENV: key_hashes(API_KEY, VICTIM_KEY),
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
                "NDIF_WS_KEEPALIVE_SECONDS": "0.5",
                "NDIF_INFLUX_URL": influx_sink.url,
                "NDIF_INFLUX_ORG": "ndif",
                "NDIF_INFLUX_TOKEN": INFLUX_TOKEN,
            },
            object_store_bucket=RESULTS_BUCKET,
            object_store_endpoint_url=s3_endpoint,
            inline_result_max_bytes=1024,
            max_request_bytes=50_000,
        ),
    ])
    url = f"http://127.0.0.1:{serve_port}"
    return {"url": url, "strict_url": url + STRICT_PREFIX, "door_url": f"http://127.0.0.1:{door}",
            "path": tiny_llama, "slow_path": slow_path, "s3": s3_endpoint, "models": models}


@pytest.fixture(scope="session")
def client_model(served: dict[str, Any]) -> Any:
    """The unmodified nnsight client pointed at the gateway; its model stays on meta."""
    import nnsight
    from nnsight import TransformersModel
    from nnsight.modeling.huggingface import _ID_CACHE

    path = str(served["path"])
    _ID_CACHE[path] = path  # the client would ask the Hub to canonicalize the repo id
    nnsight.CONFIG.API.HOST = served["url"]
    nnsight.CONFIG.API.APIKEY = None
    nnsight.CONFIG.APP.REMOTE_LOGGING = False
    return TransformersModel(path, task="text-generation")


@pytest.fixture(scope="session")
def local_model(tiny_llama: Path) -> Any:
    """The same checkpoint loaded locally, for reference results (and for in-process requests:
    frozen after the load as a replica freezes it, so a request's collection stays young)."""
    from nnsight import TransformersModel

    model = TransformersModel(str(tiny_llama), task="text-generation", dispatch=True, device_map="cpu",
                              dtype="float32")
    freeze_long_lived()
    return model


def key_hashes(*keys: str) -> str:
    return ",".join(key_digest(k) for k in keys)


@pytest.fixture(scope="session")
def slow_client_model(served: dict[str, Any], client_model: Any) -> Any:
    from nnsight import TransformersModel
    from nnsight.modeling.huggingface import _ID_CACHE

    path = str(served["slow_path"])
    _ID_CACHE[path] = path
    return TransformersModel(path, task="text-generation")


ARCHS_PREFIX = "/archs"
# More architectures through the real gateway, deployed only when a test asks for them.
ARCHS = ("gpt2", "gpt-neox")


@pytest.fixture(scope="session")
def served_archs(served: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny gpt2 and gpt-neox apps behind their own gateway at /archs: {arch: (url, path)}."""
    from ray import serve

    from ndif_operator.api.naming import model_app_name

    paths = {arch: build_tiny_model(arch, tmp_path_factory.mktemp("models") / f"tiny-{arch}")  # type: ignore[arg-type]
             for arch in ARCHS}
    apps = {arch: model_app_name("default", f"tiny-{arch}") for arch in ARCHS}
    serve.run_many([
        *(model_target(apps[arch], model_args(paths[arch], f"default/tiny-{arch}")) for arch in ARCHS),
        gateway_target({str(paths[arch]).lower(): apps[arch] for arch in ARCHS}, app_name="gateway-archs",
                       route_prefix=ARCHS_PREFIX),
    ])
    url = served["url"] + ARCHS_PREFIX
    return {arch: (url, paths[arch]) for arch in ARCHS}

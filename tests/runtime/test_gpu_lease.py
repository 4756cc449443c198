"""A pinned single-GPU replica changes level in place: HOT's GPU share is a placement group that
the replica holds, so WARM and HOT have the same `ray_actor_options` and Serve only reconfigures.

Real Ray and Serve: the session's Ray declares one pinned GPU resource (`ndif_gpu_0`), as a GPU
node does (api/pinning.py); on this CPU-only machine the leased "GPU" is host RAM.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from model_runtime.tiny_models import build_tiny_model
from runtime.conftest import PINNED_GPU, model_args


def _available(resource: str) -> float:
    import ray

    return float(ray.available_resources().get(resource, 0.0))


def _wait_available(resource: str, amount: float) -> None:
    deadline = time.monotonic() + 30
    while _available(resource) != pytest.approx(amount):
        assert time.monotonic() < deadline, f"{resource} available {_available(resource)}, expected {amount}"
        time.sleep(0.2)


def test_pinned_warm_to_hot_is_a_reconfigure_that_leases_the_planned_gpu(
    serve_port: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from ndif_operator.api.naming import MODEL_DEPLOYMENT, MODEL_IMPORT_PATH

    path = build_tiny_model("llama", tmp_path_factory.mktemp("lease") / "leased", seed=5)
    app = "md-default-leased"
    lease = {PINNED_GPU: 0.5}

    def deploy(user_config: dict[str, Any]) -> dict[str, Any]:
        """A config deploy, as KubeRay's PUT does (Serve diffs it against the running app); the
        options are what the renderer gives a pinned slot at both levels."""
        config = {"applications": [{
            "name": app, "route_prefix": None, "import_path": MODEL_IMPORT_PATH,
            "args": model_args(path, "default/leased"),
            "deployments": [{"name": MODEL_DEPLOYMENT, "num_replicas": 1, "user_config": user_config,
                             "ray_actor_options": {"num_cpus": 0, "num_gpus": 0}}],
        }]}
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
        deadline = time.monotonic() + 300
        while True:
            try:
                info = dict(serve.get_app_handle(app).info.remote().result(timeout_s=30))
            except Exception:
                info = {}
            if info.get("level") == user_config["level"] and info.get("gpu_lease") == user_config.get(
                    "gpu_lease", {}):
                return info
            assert time.monotonic() < deadline, f"never reached {user_config}: {info}"
            time.sleep(0.5)

    try:
        warm = deploy({"level": "Warm"})
        assert warm["level"] == "Warm" and warm["gpu_lease"] == {}
        _wait_available(PINNED_GPU, 1.0)  # a WARM model holds no GPU

        hot = deploy({"level": "Hot", "gpu_lease": lease})
        assert hot["startup"]["process_started"] == warm["startup"]["process_started"]  # the same process
        assert hot["level"] == "Hot" and hot["gpu_lease"] == lease and hot["source"] == "nodeMemory"
        _wait_available(PINNED_GPU, 0.5)  # Ray's accounting follows the plan

        moved = deploy({"level": "Hot", "gpu_lease": {PINNED_GPU: 0.25}})  # another share, same process
        assert moved["startup"]["process_started"] == warm["startup"]["process_started"]
        assert moved["gpu_lease"] == {PINNED_GPU: 0.25}
        _wait_available(PINNED_GPU, 0.75)

        back = deploy({"level": "Warm"})
        assert back["startup"]["process_started"] == warm["startup"]["process_started"]
        assert back["level"] == "Warm" and back["gpu_lease"] == {}
        _wait_available(PINNED_GPU, 1.0)
    finally:
        serve.delete(app)
    _wait_available(PINNED_GPU, 1.0)  # nothing leaked

"""A pinned single-GPU replica changes level in place: HOT's GPU share is a placement group that
the replica holds, so WARM and HOT have the same `ray_actor_options` and Serve only reconfigures.

Real Ray and Serve: the session's Ray declares one pinned GPU resource (`ndif_gpu_0`), as a GPU
node does (api/pinning.py); on this CPU-only machine the leased "GPU" is host RAM.
"""

from __future__ import annotations

import contextlib
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


def _group(name: str, state: str, resources: dict[str, float], node: str | None = None) -> dict[str, Any]:
    return {"name": name, "state": state, "bundles": {0: resources},
            "bundles_to_node_id": {0: node} if node else {}}


def test_gpu_waits_name_the_waiting_model_and_the_holders_on_its_node() -> None:
    """Pure: the placement group table as Ray answers it."""
    from model_runtime.gpu_waits import gpu_waits, group_name

    table = {
        "a": _group(group_name("ml/new", "n1", 1000.0, 300), "PENDING", {"ndif_gpu_2": 0.5}),
        "b": _group(group_name("ml/old", "n1", 900.0, 300), "CREATED", {"ndif_gpu_2": 0.75}, "n1"),
        "c": _group(group_name("ml/elsewhere", "n2", 900.0, 300), "CREATED", {"ndif_gpu_2": 0.75}, "n2"),
        "d": _group(group_name("ml/other-gpu", "n1", 900.0, 300), "CREATED", {"ndif_gpu_3": 1.0}, "n1"),
        "e": _group(group_name("ml/gone", "n1", 800.0, 300), "REMOVED", {"ndif_gpu_2": 1.0}, "n1"),
        "f": _group("someone-elses-group", "CREATED", {"ndif_gpu_2": 0.25}, "n1"),
        "g": _group(group_name("ml/free", "n1", 950.0, 300), "CREATED", {"ndif_gpu_3": 0.1}, "n1"),
    }
    (wait,) = gpu_waits(table).values()
    assert (wait.model, wait.node, wait.since, wait.holders) == ("ml/new", "n1", 1000.0, ("ml/old",))
    text = wait.describe(now=1042.0)
    assert text.startswith("waiting for GPU 2 (ndif_gpu_2: 0.5) on node n1, held by ml/old: 42 s so far")
    assert "gives up after 300 s" in text
    # what the operator writes into Ready: the same while the wait lasts, the seconds only in /status
    stable = wait.condition_message()
    assert stable == ("waiting since 1970-01-01T00:16:40Z for GPU 2 (ndif_gpu_2: 0.5) on node n1, held by ml/old; "
                      "gives up at 1970-01-01T00:21:40Z")
    assert wait.as_json(now=1042.0)["message"] == wait.as_json(now=1099.0)["message"] == stable
    assert wait.as_json(now=1042.0)["waited_s"] == 42.0
    assert gpu_waits({"x": _group(group_name("ml/new", "n1", 1.0, 300), "CREATED", {"ndif_gpu_2": 0.5}, "n1")}) == {}


def test_a_replica_waiting_for_a_held_gpu_share_is_shown_by_the_gateway_at_once(
    serve_port: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Another model holds most of the pinned GPU: a Hot replica that leases half of it waits,
    and the gateway's 503 and `/status` say so (whose GPU, since when) while it waits, not after
    the 5 min timeout; once the holder lets go, the replica takes the share and serves."""
    import httpx
    import ray
    from ray import serve
    from ray.util.placement_group import placement_group, remove_placement_group

    from model_runtime.gpu_waits import group_name
    from runtime.conftest import gateway_target, model_target, route
    from runtime.wire import post

    node = ray.get_runtime_context().get_node_id()
    holder = placement_group([{PINNED_GPU: 0.75}], name=group_name("ml/holder", node, time.time(), 300))
    assert holder.wait(timeout_seconds=30)
    path = build_tiny_model("llama", tmp_path_factory.mktemp("lease") / "waiting", seed=6)
    app, key, prefix = "md-ml-waiting", "lease/waiting", "/lease-gateway"
    url = f"http://127.0.0.1:{serve_port}{prefix}"
    try:
        serve.run_many([  # the model app stays DEPLOYING while it waits: not waited for here
            model_target(app, model_args(path, "ml/waiting"), {"level": "Hot", "gpu_lease": {PINNED_GPU: 0.5}}),
            gateway_target(routes={key: route(app, deployment="ml/waiting", repo_id=key)},
                           app_name="gateway-lease", route_prefix=prefix),
        ], wait_for_applications_running=False)
        deadline = time.monotonic() + 120
        while True:
            refused = post(url, key, b"x")
            detail = refused.json().get("detail", "") if refused.headers.get("content-type") == (
                "application/json") else refused.text  # Serve's proxy answers plain text while the app starts
            if "waiting for GPU 0" in detail:
                break
            assert time.monotonic() < deadline, detail
            time.sleep(0.5)
        assert refused.status_code == 503 and "held by ml/holder" in detail and "gives up after 300 s" in detail
        assert 1 <= int(refused.headers["Retry-After"]) <= 30
        shown = httpx.get(f"{url}/status", timeout=30).json()["deployments"][app]
        assert shown["application_state"] == "DEPLOYING" and shown["gpu_wait"]["holders"] == ["ml/holder"]
        assert time.time() - shown["gpu_wait"]["since"] < 120
        remove_placement_group(holder)  # the holder lets go: the waiting replica takes its share
        deadline = time.monotonic() + 120
        while (shown := httpx.get(f"{url}/status", timeout=30).json()["deployments"][app])[
                "application_state"] != "RUNNING":
            assert time.monotonic() < deadline, shown
            time.sleep(0.5)
        assert shown["gpu_wait"] is None and shown["deployment_level"] == "HOT"
    finally:
        serve.delete("gateway-lease")
        serve.delete(app)
        with contextlib.suppress(Exception):  # already removed when the test got that far
            remove_placement_group(holder)
    _wait_available(PINNED_GPU, 1.0)

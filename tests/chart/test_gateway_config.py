"""One place for the gateway's cluster settings: chart values → the operator's NDIF_* env →
OperatorSettings → the gateway application's args in the rendered Serve config; Secrets stay
references (mounted volumes), never values."""

from __future__ import annotations

from typing import Any

from rendering import manifests, render, values_of

from ndif_operator.api.naming import GATEWAY_APP, GATEWAY_DIRECT_PORT
from ndif_operator.operator.settings import OperatorSettings
from ndif_operator.planning import Plan
from ndif_operator.rendering import render_serve_config


def _operator_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    return {e["name"]: e["value"] for e in env if "value" in e}


def test_values_reach_the_rendered_gateway_args(monkeypatch: Any) -> None:
    docs = manifests(render(values_of("rayservice")))
    for name, value in _operator_env(docs).items():
        monkeypatch.setenv(name, value)
    settings = OperatorSettings()
    config = render_serve_config(Plan(decisions=()), {}, options=settings.render_options())
    gateway = next(app for app in config["applications"] if app["name"] == GATEWAY_APP)
    args = gateway["args"]
    assert args["object_store_bucket"] == "ndif-results"
    assert args["object_store_endpoint_url"] == "https://s3.example.org"
    assert args["api_key_hashes_dir"] == "/etc/ndif/api-keys"
    assert args["min_nnsight_version"] == "0.8.1"
    assert args["max_request_bytes"] == 1073741824
    # The same directory is where the RayService mounts the API-key Secret, on the head, where the
    # gateway is pinned (its Ray resource) and where its credentials are (test_chart.py).
    assert gateway["deployments"][0]["ray_actor_options"]["resources"] == {"node:__internal_head__": 0.001}
    ray_service = next(d for d in docs if d["kind"] == "RayService")
    head = ray_service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    (container,) = head["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in head["spec"]["volumes"]}
    assert mounts["api-keys"] == args["api_key_hashes_dir"]
    assert volumes["api-keys"]["secret"]["secretName"] == "ndif-api-keys"
    assert mounts["gateway-credentials"] == "/etc/ndif/gateway-credentials"  # files, never env


def test_the_gateway_door_is_one_value_from_args_to_ingress(monkeypatch: Any) -> None:
    """`gateway.directPort`: the gateway's rendered `direct_port`, a port of the head container (so of
    KubeRay's head Service, which follows the active cluster) and the Ingress's backend; 0 turns the
    door off everywhere and users go through Serve's proxy."""
    for port in (GATEWAY_DIRECT_PORT, 9123, 0):
        docs = manifests(render({**values_of("rayservice"), "gateway": {**values_of("rayservice")["gateway"],
                                                                         "directPort": port}}))
        for name, value in _operator_env(docs).items():
            monkeypatch.setenv(name, value)
        config = render_serve_config(Plan(decisions=()), {}, options=OperatorSettings().render_options())
        gateway = next(app for app in config["applications"] if app["name"] == GATEWAY_APP)
        ray_service = next(d for d in docs if d["kind"] == "RayService")
        (head,) = ray_service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in head["ports"]}
        ingress = next(d for d in docs if d["kind"] == "Ingress")
        backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        if port:
            assert gateway["args"]["direct_port"] == port and ports["gateway"] == port
            assert backend == {"name": "ndif-head-svc", "port": {"number": port}}
        else:
            assert gateway["args"]["direct_port"] is None and "gateway" not in ports
            assert backend == {"name": "ndif-serve-svc", "port": {"number": 8000}}
        assert ports["serve"] == 8000  # Serve's proxy keeps serving: KubeRay's health checks and serve Service


def test_defaults_render_the_gateway_defaults() -> None:
    settings = OperatorSettings(**{k.removeprefix("NDIF_").lower(): v
                                   for k, v in _operator_env(manifests(render({}))).items() if v != ""})
    assert settings.gateway_args() == OperatorSettings().gateway_args()
    assert settings.gateway_args().object_store_bucket is None and settings.gateway_args().api_key_hashes_dir is None


def test_no_secret_value_is_inlined() -> None:
    text = "".join(render(values_of("rayservice")).values())
    for kind in ("kind: Secret", "AWS_SECRET_ACCESS_KEY:", "stringData"):
        assert kind not in text


def test_log_format_reaches_serve_logging_config() -> None:
    from ndif_operator.rendering import check_serve_config

    for fmt, encoding in (("json", "JSON"), ("text", "TEXT")):
        options = OperatorSettings(log_format=fmt).render_options()
        config = render_serve_config(Plan(decisions=()), {}, options=options)
        assert config["logging_config"] == {"encoding": encoding}
        check_serve_config(config)  # Serve's own schema accepts it

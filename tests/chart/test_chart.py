"""`helm lint` and `helm template` of charts/ndif-operator with several values files, every manifest
validated against its schema, golden files for the defaults, and the chart's generated parts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml
from rendering import (
    CHART,
    HERE,
    KUBE_VERSIONS,
    NAMESPACE,
    ROOT,
    VALUES_FILES,
    chart_with,
    manifests,
    render,
    validate,
    values_of,
)

from ndif_operator.api.naming import GATEWAY_DIRECT_PORT
from ndif_operator.chart import generate
from ndif_operator.chart.values import ChartValues

GOLDEN = HERE / "golden" / "default.yaml"


@pytest.mark.parametrize("name", VALUES_FILES)
def test_helm_lint_is_clean(name: str) -> None:
    report = helm_python.lint(CHART, values_of(name), strict=True, namespace=NAMESPACE, kube_version="v1.29.0")
    assert report["errors"] == [] and report["messages"] == [], report


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", VALUES_FILES)
def test_every_manifest_is_valid(name: str, kube_version: str) -> None:
    docs = manifests(render(values_of(name)))
    assert docs
    for doc in docs:
        validate(doc, kube_version)


def test_the_chart_crds_are_the_generated_files_and_valid() -> None:
    generated = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    links = sorted((CHART / "crds").iterdir())
    assert [p.name for p in links] == generated, "link every generated CRD into the chart's crds/"
    for link in links:
        assert link.is_symlink() and link.resolve() == (ROOT / "crds" / link.name).resolve()
    chart = helm_python.Chart.load(CHART)
    try:
        crds = chart.crds
    finally:
        chart.close()
    assert sorted(c["name"] for c in crds) == [f"crds/{name}" for name in generated]
    for crd in crds:  # Helm follows the links: what it installs is the generated file itself
        assert crd["data"] == (ROOT / crd["name"]).read_text()
        for version in KUBE_VERSIONS:
            validate(yaml.safe_load(crd["data"]), version)


def _kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(f"{d['kind']}/{d['metadata'].get('namespace', '-')}/{d['metadata']['name']}" for d in docs)


def test_defaults_match_the_golden_file() -> None:
    rendered = render({})
    text = "".join(f"# Source: {path}\n{rendered[path].strip()}\n---\n" for path in sorted(rendered)
                   if not path.endswith("NOTES.txt"))
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "defaults changed: review, then rerun with UPDATE_GOLDEN=1"


def test_deployment_is_locked_down() -> None:
    docs = manifests(render({}))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def _env(values: dict[str, Any]) -> dict[str, str]:
    deployment = next(d for d in manifests(render(values)) if d["kind"] == "Deployment")
    return {e["name"]: e.get("value", "") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_the_environment_names_real_settings() -> None:
    from ndif_operator.operator.settings import OperatorSettings

    env = _env(values_of("rayservice"))
    known = {f"NDIF_{name.upper()}" for name in OperatorSettings.model_fields}
    assert set(env) - known == set(), "the chart sets NDIF_* variables the operator does not read"
    settings = OperatorSettings(**{k.removeprefix("NDIF_").lower(): v for k, v in env.items() if v != ""
                                   and k != "NDIF_OPERATOR_NAMESPACE"})
    assert settings.ray_service == "ndif" and settings.read_nodes


def test_namespaced_mode_watches_only_its_namespaces() -> None:
    env = _env(values_of("namespaced"))
    assert env["NDIF_NAMESPACES"] == "team-a,team-b" and env["NDIF_READ_NODES"] == "false"
    assert _env({"watch": {"namespaced": True}})["NDIF_NAMESPACES"] == NAMESPACE


_RBAC = """\
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: generated}
rules:
- {apiGroups: [ndif.dev], resources: [modeldeployments], verbs: [get, list, watch, patch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: generated-own}
rules:
- {apiGroups: [""], resources: [configmaps], verbs: [get, create, patch]}
"""


def _rules(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return {f"{d['metadata'].get('namespace', '-')}/{d['metadata']['name']}": d["rules"] for d in docs
            if d["kind"] == kind}


def test_rbac_template_ships_the_given_rules_unchanged(tmp_path: Path) -> None:
    given = list(yaml.safe_load_all(_RBAC))
    chart = chart_with(tmp_path, {"files/rbac.yaml": _RBAC})
    docs = manifests(render({}, chart))
    assert list(_rules(docs, "ClusterRole").values()) == [given[0]["rules"]]
    assert list(_rules(docs, "Role").values()) == [given[1]["rules"]]
    binding = next(d for d in docs if d["kind"] == "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ndif-operator", "namespace": NAMESPACE}]
    # Namespaced-only: the cluster rules become a Role in each watched namespace; no cluster-wide grant.
    docs = manifests(render(values_of("namespaced"), chart))
    assert not _rules(docs, "ClusterRole") and not [d for d in docs if d["kind"] == "ClusterRoleBinding"]
    roles = _rules(docs, "Role")
    assert roles == {"team-a/ndif-operator": given[0]["rules"], "team-b/ndif-operator": given[0]["rules"],
                     f"{NAMESPACE}/ndif-operator-own-namespace": given[1]["rules"]}
    for version in KUBE_VERSIONS:
        for doc in docs:
            validate(doc, version)


def test_a_wrong_value_fails_with_its_path() -> None:
    with pytest.raises(helm_python.HelmValuesError, match="/rayService/workerGroups/0/gpus"):
        render({"rayService": {"create": True, "workerGroups": [{"name": "a", "gpus": -1}]}})
    with pytest.raises(helm_python.HelmValuesError, match="additional properties 'replica' not allowed"):
        render({"operator": {"replica": 2}})


def test_generated_values_are_current_and_valid() -> None:
    assert generate.write(check=True) == [], "run `ndif-operator generate`"
    ChartValues.model_validate(yaml.safe_load((CHART / "values.yaml").read_text()))
    for name in VALUES_FILES:
        ChartValues.model_validate(values_of(name))  # partial files: every field has a default


def test_worker_group_fallbacks_match_the_model() -> None:
    """Helm does not default list items: the template's fallbacks must equal the model's defaults."""
    minimal = render({"rayService": {"create": True, "workerGroups": [{"name": "gpu"}]}})
    full = render({"rayService": {"create": True}})  # the values.yaml group: every field from the model
    assert minimal == full


def test_the_chart_grants_exactly_the_generated_rbac() -> None:
    """The generated RBAC (ndif_operator/operator/rbac.py → files/rbac.yaml) reaches the cluster unchanged."""
    generated = [d for d in yaml.safe_load_all((CHART / "files" / "rbac.yaml").read_text()) if d]
    cluster_rules = [d["rules"] for d in generated if d["kind"] == "ClusterRole"]
    own_rules = [d["rules"] for d in generated if d["kind"] == "Role"]
    docs = manifests(render({}))
    assert list(_rules(docs, "ClusterRole").values()) == cluster_rules
    assert list(_rules(docs, "Role").values()) == own_rules
    namespaced = manifests(render(values_of("namespaced")))
    assert not _rules(namespaced, "ClusterRole")
    roles = _rules(namespaced, "Role")
    for ns in ("team-a", "team-b"):
        assert [roles[f"{ns}/ndif-operator"]] == cluster_rules


def test_chart_defaults_are_the_operator_defaults() -> None:
    """The chart sets these variables always: its defaults must not silently change the operator's."""
    from ndif_operator.operator.settings import OperatorSettings

    env = _env({})
    defaults = OperatorSettings()
    for variable in ("NDIF_RAY_SERVICE", "NDIF_CPU_ONLY", "NDIF_RESYNC_SECONDS", "NDIF_UNREADY_AFTER_FAILING_SECONDS",
                     "NDIF_METRICS_PORT", "NDIF_HEALTH_PORT", "NDIF_LOG_FORMAT", "NDIF_LOG_LEVEL", "NDIF_READ_NODES"):
        from_chart = OperatorSettings(**{variable.removeprefix("NDIF_").lower(): env[variable]})
        name = variable.removeprefix("NDIF_").lower()
        assert getattr(from_chart, name) == getattr(defaults, name), variable


RAY_PODS = {"app.kubernetes.io/name": "ndif-operator", "app.kubernetes.io/instance": "ndif-operator",
            "app.kubernetes.io/component": "ray"}


def _policy(docs: list[dict[str, Any]], pods: str) -> dict[str, Any]:
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith(f"-ray-{pods}")]
    return policy


def test_ray_workers_reach_only_ray_dns_and_the_object_store() -> None:
    docs = manifests(render(values_of("rayservice")))
    policy = _policy(docs, "workers")
    spec = policy["spec"]
    ray_pods = RAY_PODS
    assert spec["podSelector"]["matchLabels"] == {**ray_pods, "ray.io/node-type": "worker"}
    # The selected pods are the RayService's workers (KubeRay adds ray.io/node-type to its pods).
    rayservice = next(d for d in docs if d["kind"] == "RayService")
    for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        assert ray_pods.items() <= group["template"]["metadata"]["labels"].items()
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    ray_peer, dns, store, mirror = spec["egress"]
    assert ray_peer == {"to": [{"podSelector": {"matchLabels": ray_pods}}]}
    assert {p["port"] for p in dns["ports"]} == {53} and dns["to"][0]["podSelector"]["matchLabels"] == {
        "k8s-app": "kube-dns"}
    assert store == {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
                     "ports": [{"port": 443, "protocol": "TCP"}, {"port": 9000, "protocol": "TCP"}]}
    assert mirror["to"] == [{"ipBlock": {"cidr": "10.30.0.5/32"}}]
    assert spec["ingress"][0] == {"from": [{"podSelector": {"matchLabels": ray_pods}}]}
    assert {p["port"] for p in spec["ingress"][1]["ports"]} == {8000, 8080} and "from" not in spec["ingress"][1]


def test_by_default_the_workers_also_reach_public_https_for_the_hub() -> None:
    policy = _policy(manifests(render({})), "workers")
    hub = policy["spec"]["egress"][-1]
    assert hub["ports"] == [{"port": 443, "protocol": "TCP"}]
    (block,) = hub["to"]
    assert block["ipBlock"]["cidr"] == "0.0.0.0/0" and "169.254.0.0/16" in block["ipBlock"]["except"]
    assert "10.0.0.0/8" in block["ipBlock"]["except"]


def _ports(rule: dict[str, Any]) -> set[int]:
    return {p["port"] for p in rule["ports"]}


def test_the_ray_head_is_reached_by_ray_users_the_operator_and_kuberay_only() -> None:
    docs = manifests(render(values_of("rayservice")))
    spec = _policy(docs, "head")["spec"]
    assert spec["podSelector"]["matchLabels"] == {**RAY_PODS, "ray.io/node-type": "head"}
    rayservice = next(d for d in docs if d["kind"] == "RayService")
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    assert RAY_PODS.items() <= head["metadata"]["labels"].items()
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    ray, gateway, dashboard, metrics = spec["ingress"]
    assert ray == {"from": [{"podSelector": {"matchLabels": RAY_PODS}}]}
    # The gateway's ports are the head container's Serve port, which the serve Service targets, and the
    # gateway's own listener, which KubeRay's head Service exposes from the container's ports.
    (container,) = head["spec"]["containers"]
    serve_service = rayservice["spec"]["serveService"]["spec"]
    door = {p["containerPort"] for p in container["ports"] if p["name"] == "gateway"}
    assert door == {GATEWAY_DIRECT_PORT}
    assert _ports(gateway) == {p["targetPort"] for p in serve_service["ports"]} | door <= {
        p["containerPort"] for p in container["ports"]}
    # Only the Ingress controller, and the operator (its /demand long-poll) whose pods the selector matches.
    ingress_controller, operator = gateway["from"]
    assert ingress_controller["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "ingress-nginx"}
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    operator_labels = operator["podSelector"]["matchLabels"]
    assert operator_labels["app.kubernetes.io/component"] == "operator"
    assert operator_labels.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert _ports(dashboard) == {8265} and dashboard["from"] == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]
    assert _ports(metrics) == {8080} and "from" not in metrics


def test_the_ray_head_reaches_only_ray_dns_and_the_gateways_destinations() -> None:
    egress = _policy(manifests(render(values_of("rayservice"))), "head")["spec"]["egress"]
    ray, dns, results, influx, api_server = egress
    assert ray == {"to": [{"podSelector": {"matchLabels": RAY_PODS}}]}
    assert _ports(dns) == {53} and dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert results == {"to": [{"ipBlock": {"cidr": "10.40.0.0/24"}}], "ports": [{"port": 443, "protocol": "TCP"}]}
    assert influx["to"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "influxdb2"}
    assert _ports(influx) == {8086}
    assert api_server["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}] and _ports(api_server) == {443, 6443}


def test_by_default_the_head_is_reached_on_the_gateway_port_from_anywhere_and_reaches_only_ray_and_dns() -> None:
    spec = _policy(manifests(render({})), "head")["spec"]
    gateway = spec["ingress"][1]
    assert _ports(gateway) == {8000, GATEWAY_DIRECT_PORT} and "from" not in gateway  # the proxy and the door
    assert len(spec["egress"]) == 2  # the Ray pods and DNS: no API server, no internet


def test_the_head_reaches_public_https_only_when_asked() -> None:
    values = {"rayService": {"create": True, "networkPolicy": {"head": {"publicHttps": True}}},
              "gateway": {"objectStore": {"bucket": "ndif-results"}}}
    hub = _policy(manifests(render(values)), "head")["spec"]["egress"][-1]
    (block,) = hub["to"]
    assert _ports(hub) == {443} and "169.254.0.0/16" in block["ipBlock"]["except"]


@pytest.mark.parametrize(("values", "missing"), [
    ({"rayService": {"create": True, "autoscaler": True}}, "head.apiServer.to"),
    ({"rayService": {"create": True}, "gateway": {"objectStore": {"bucket": "ndif-results"}}}, "head.resultsStore.to"),
    ({"rayService": {"create": True}, "gateway": {"influx": {"url": "http://influx:8086"}}}, "head.influx.to"),
])
def test_a_head_destination_the_gateway_needs_but_the_policy_omits_fails_the_install(
        values: dict[str, Any], missing: str) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=missing.replace(".", r"\.")):
        render(values)


def test_the_network_policy_can_be_turned_off() -> None:
    docs = manifests(render({"rayService": {"networkPolicy": {"enabled": False}}}))
    assert not [d for d in docs if d["kind"] == "NetworkPolicy"]


def _ray_pods(values: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(head pod spec, worker pod specs, the head group) of the chart's RayService."""
    rayservice = next(d for d in manifests(render(values)) if d["kind"] == "RayService")
    config = rayservice["spec"]["rayClusterConfig"]
    head = config["headGroupSpec"]
    return head["template"]["spec"], [g["template"]["spec"] for g in config["workerGroupSpecs"]], head


def _secret_names(pod: dict[str, Any]) -> set[str]:
    """Every Secret a pod's volumes or its container's env reach."""
    names = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    names |= {s["secret"]["name"] for v in pod["volumes"] for s in v.get("projected", {}).get("sources", [])}
    (container,) = pod["containers"]
    names |= {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]
              if "secretKeyRef" in e.get("valueFrom", {})}
    return names | {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}


def test_the_gateways_credentials_are_files_on_the_head_only() -> None:
    """The results bucket's keys and the InfluxDB token are mounted where the gateway runs (the head,
    where the operator pins it) and nowhere else; the workers, where model replicas run users' code,
    get only the read-only weights keys. Never as environment variables."""
    head, workers, head_group = _ray_pods(values_of("rayservice"))
    (container,) = head["containers"]
    assert "envFrom" not in container
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NDIF_CREDENTIALS_DIR"] == "/etc/ndif/gateway-credentials"
    assert (env["NDIF_INFLUX_URL"], env["NDIF_INFLUX_ORG"], env["NDIF_INFLUX_BUCKET"]) == (
        "http://influx.monitoring:8086", "ndif", "ndif")
    assert {"name": "gateway-credentials", "mountPath": "/etc/ndif/gateway-credentials", "readOnly": True} in (
        container["volumeMounts"])
    volume = next(v for v in head["volumes"] if v["name"] == "gateway-credentials")
    assert volume["projected"] == {"defaultMode": 0o440, "sources": [
        {"secret": {"name": "ndif-s3"}},
        {"secret": {"name": "ndif-influx", "items": [{"key": "token", "path": "NDIF_INFLUX_TOKEN"}]}}]}
    assert _secret_names(head) == {"ndif-s3", "ndif-influx", "ndif-api-keys"}
    assert head_group["rayStartParams"]["num-cpus"] == "0"  # no model replica fits on the head
    for pod in workers:
        (container,) = pod["containers"]
        assert "envFrom" not in container
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["NDIF_CREDENTIALS_DIR"] == "/etc/ndif/weights-credentials"
        assert not any(name.startswith("NDIF_INFLUX") for name in env)
        assert _secret_names(pod) == {"ndif-weights-readonly"}
        assert [m["name"] for m in container["volumeMounts"]] == ["dshm", "weights-credentials"]


def test_without_a_weights_secret_the_workers_get_no_credentials() -> None:
    values = values_of("rayservice")
    del values["rayService"]["weightsCredentialsSecret"]
    _, workers, _ = _ray_pods(values)
    for pod in workers:
        (container,) = pod["containers"]
        assert _secret_names(pod) == set() and [v["name"] for v in pod["volumes"]] == ["dshm"]
        assert not any(e["name"] in ("NDIF_CREDENTIALS_DIR", "NDIF_INFLUX_URL") for e in container["env"])

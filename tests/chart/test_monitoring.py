"""Alerts and dashboards: promtool checks and unit-tests the rules, every alert fires in a test and
has a runbook, every metric name a rule or dashboard uses is one that is really exported."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from rendering import CHART, HERE, ROOT, manifests, render

from model_runtime import metrics as runtime_metrics
from ndif_operator.chart.dashboards import dashboards, exprs
from ndif_operator.operator import metrics as operator_metrics

RULES = CHART / "files" / "alerts.yaml"
RULE_TESTS = HERE / "alerts_test.yaml"
RUNBOOKS = ROOT / "docs" / "alerts.md"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed: tools/install_promtool.sh")

# Series that other software exports, with where each is defined (checked by name below).
EXTERNAL = {
    "up": "Prometheus: one per scrape target",
    "kuberay_service_condition_ready": "KubeRay v1.7.0 ray-operator/controllers/ray/metrics/ray_service_metrics.go",
    "ray_serve_application_status": "Ray 2.60 ray/serve/_private/application_state.py (serve_application_status)",
}

_PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "on", "ignoring", "group_left", "group_right", "and",
    "or", "unless", "rate", "increase", "irate", "histogram_quantile", "absent", "vector", "label_values",
    "bool", "offset", "le", "topk", "bottomk", "clamp_min", "clamp_max",
}


def _alerts() -> list[dict[str, object]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    run = subprocess.run([str(PROMTOOL), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


@needs_promtool
def test_promtool_unit_tests_fire_every_alert() -> None:
    run = subprocess.run([str(PROMTOOL), "test", "rules", RULE_TESTS.name], capture_output=True, text=True,
                         timeout=120, cwd=HERE)
    assert run.returncode == 0, run.stdout + run.stderr
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {t["alertname"] for case in cases for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert {str(a["alert"]) for a in _alerts()} <= fired, "every alert needs series that fire it"


def test_every_alert_has_a_runbook() -> None:
    headings = {line.removeprefix("## ").strip() for line in RUNBOOKS.read_text().splitlines()
                if line.startswith("## ")}
    for alert in _alerts():
        name = str(alert["alert"])
        annotations = alert["annotations"]
        assert isinstance(annotations, dict)
        assert name in headings, f"docs/alerts.md has no section for {name}"
        assert annotations["runbook_url"].endswith(f"docs/alerts.md#{name.lower()}")
        assert alert["labels"]["severity"] in ("critical", "warning", "info")  # type: ignore[index]


def test_the_prometheus_rule_ships_the_rule_file_unchanged() -> None:
    rule = next(d for d in manifests(render({})) if d["kind"] == "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def _operator_series() -> set[str]:
    names = set()
    for family in operator_metrics.REGISTRY.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        if family.type == "histogram":
            names.update(f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
    return names


def _metric_names(expr: str) -> set[str]:
    expr = re.sub(r"label_values\(\s*([^,]+),[^)]*\)", r"\1", expr)  # Grafana: label_values(metric, label)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "{}", expr)  # matchers
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)  # ranges
    expr = re.sub(r"(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {w for w in words if w not in _PROMQL_WORDS and not w.startswith("__")}


def _used() -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}
    for alert in _alerts():
        used.setdefault(f"alert {alert['alert']}", set()).update(_metric_names(str(alert["expr"])))
    for name, model in dashboards().items():
        for expr in exprs(model):
            used.setdefault(f"dashboard {name}", set()).update(_metric_names(expr))
    return used


def test_every_metric_used_exists() -> None:
    known = _operator_series() | runtime_metrics.EXPORTED | set(EXTERNAL)
    used = _used()
    for where, names in used.items():
        assert names, where
        assert names <= known, f"{where} uses metrics nothing exports: {sorted(names - known)}"
    everything = set().union(*used.values())
    assert {"ray_ndif_queue_depth", "ray_ndif_gateway_refusals_total", "ray_ndif_requests_total",
            "ndif_operator_modeldeployment_wanted_level",
            "ndif_operator_modeldeployment_gpu_memory_bytes"} <= everything


def test_external_metrics_exist_where_they_are_said_to() -> None:
    ray_source = Path(__import__("ray").__file__).parent / "serve" / "_private" / "application_state.py"
    assert '"serve_application_status"' in ray_source.read_text()


def test_runtime_exports_are_named_as_ray_names_them() -> None:
    # Measured on Ray 2.60: `ray_` prefix; counters `_total`; histograms `_bucket/_sum/_count`.
    assert runtime_metrics.exported_names("ndif_requests", "counter") == ("ray_ndif_requests_total",)
    assert runtime_metrics.exported_names("ndif_queue_depth", "gauge") == ("ray_ndif_queue_depth",)
    assert "ray_ndif_request_seconds_bucket" in runtime_metrics.EXPORTED
    docs = (ROOT / "docs" / "metrics.md").read_text()
    for series in runtime_metrics.EXPORTED:
        base = re.sub(r"_(bucket|sum|count)$", "", series)
        assert base in docs, f"docs/metrics.md does not list {base}"


def test_dashboards_ship_as_labelled_config_maps() -> None:
    maps = [d for d in manifests(render({})) if d["kind"] == "ConfigMap"]
    assert sorted(m["metadata"]["name"] for m in maps) == [
        "ndif-operator-dashboard-fleet", "ndif-operator-dashboard-model", "ndif-operator-dashboard-operator"]
    for config_map in maps:
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        (body,) = config_map["data"].values()
        model = json.loads(body)
        assert model["uid"].startswith("ndif-") and model["panels"]
    assert not [d for d in manifests(render({"monitoring": {"enabled": False}})) if d["kind"] == "ConfigMap"]


@needs_promtool
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses every dashboard query (Grafana's variables replaced by plain values)."""
    rules = []
    for name, model in dashboards().items():
        for i, expr in enumerate(exprs(model)):
            if expr.startswith("label_values("):
                continue
            plain = expr.replace("$__rate_interval", "5m").replace("$model", ".*").replace("$modeldeployment", ".*")
            rules.append({"record": f"ndif:{name}_{i}", "expr": plain})
    path = tmp_path / "dashboards.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    run = subprocess.run([str(PROMTOOL), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr

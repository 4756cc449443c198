"""The Grafana dashboards, as code (grafana-foundation-sdk): fleet, per-model and operator.

`ndif-operator generate` writes them as JSON into `charts/ndif-operator/dashboards/`; the chart
ships each as a ConfigMap labelled `grafana_dashboard: "1"` (the Grafana sidecar of
kube-prometheus-stack loads those). Queries use the names Prometheus really scrapes: the
operator's `ndif_operator_*`, the runtime's `ray_ndif_*` (Ray prefixes `ray_`, counters end in
`_total`), Ray Serve's `ray_serve_*`. A test checks every name used here exists.

The SDK is a development dependency: imported only when the dashboards are generated.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

DATASOURCE = "${datasource}"
RATE = "$__rate_interval"


def _builders() -> Any:
    from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
    from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

    return SimpleNamespace(dashboard=dashboard, prometheus=prometheus, stat=stat, timeseries=timeseries,
                           ref=DataSourceRef(type_val="prometheus", uid=DATASOURCE), refresh=VariableRefresh)


def _query(b: Any, expr: str, legend: str = "") -> Any:
    query = b.prometheus.Dataquery().expr(expr).datasource(b.ref)
    return query.legend_format(legend) if legend else query


def _series(b: Any, title: str, unit: str, *queries: tuple[str, str], width: int = 12) -> Any:
    panel = b.timeseries.Panel().title(title).unit(unit).datasource(b.ref).height(8).span(width)
    for expr, legend in queries:
        panel = panel.with_target(_query(b, expr, legend))
    return panel


def _stat(b: Any, title: str, expr: str, unit: str = "none", width: int = 6) -> Any:
    return b.stat.Panel().title(title).unit(unit).datasource(b.ref).height(4).span(width).with_target(
        _query(b, expr))


def _base(b: Any, uid: str, title: str, description: str) -> Any:
    source = b.dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus")
    return (b.dashboard.Dashboard(title).uid(uid).description(description).tags(["ndif"])
            .refresh("30s").time("now-6h", "now").timezone("browser").with_variable(source))


def _label_variable(b: Any, name: str, metric: str, label: str) -> Any:
    return (b.dashboard.QueryVariable(name).label(name).datasource(b.ref)
            .query(f"label_values({metric}, {label})").refresh(b.refresh.ON_TIME_RANGE_CHANGED)
            .multi(True).include_all(True).all_value(".*"))


def fleet(b: Any) -> Any:
    return (
        _base(b, "ndif-fleet", "NDIF / Fleet", "GPUs planned and available, models per level, placement changes.")
        .with_row(b.dashboard.Row("Capacity"))
        .with_panel(_stat(b, "GPUs available", "sum(ndif_operator_gpus_available)"))
        .with_panel(_stat(b, "GPUs planned", "sum(ndif_operator_gpus_planned)"))
        .with_panel(_stat(b, "Models below their wanted level", "count(ndif_operator_modeldeployment_wanted_level"
                          " > ndif_operator_modeldeployment_granted_level) or vector(0)"))
        .with_panel(_stat(b, "Hot models", 'sum(ndif_operator_deployments{level="Hot"})'))
        .with_panel(_series(b, "GPUs planned / available per RayService", "none",
                            ("sum by (ray_service) (ndif_operator_gpus_available)", "{{ray_service}} available"),
                            ("sum by (ray_service) (ndif_operator_gpus_planned)", "{{ray_service}} planned")))
        .with_panel(_series(b, "Models per level", "none",
                            ("sum by (level) (ndif_operator_deployments)", "{{level}}")))
        .with_row(b.dashboard.Row("Placement"))
        .with_panel(_series(b, "Level changes", "none",
                            (f"sum by (from_level, to_level) (increase(ndif_operator_level_changes_total[{RATE}]))",
                             "{{from_level}} → {{to_level}}")))
        .with_panel(_series(b, "GPU memory per Hot replica", "bytes",
                            ("max by (namespace, modeldeployment) (ndif_operator_modeldeployment_gpu_memory_bytes)"
                             " > 0", "{{namespace}}/{{modeldeployment}}")))
        .with_row(b.dashboard.Row("Traffic"))
        .with_panel(_series(b, "Requests per model", "reqps",
                            (f"sum by (model) (rate(ray_ndif_requests_total[{RATE}]))", "{{model}}")))
        .with_panel(_series(b, "Gateway refusals", "reqps",
                            (f"sum by (reason) (rate(ray_ndif_gateway_refusals_total[{RATE}]))", "{{reason}}")))
    )


def per_model(b: Any) -> Any:
    selector = 'model=~"$model"'
    return (
        _base(b, "ndif-model", "NDIF / Model", "One model: requests, latency, queue, errors, activations, memory.")
        .with_variable(_label_variable(b, "model", "ray_ndif_requests_total", "model"))
        .with_variable(_label_variable(b, "modeldeployment", "ndif_operator_modeldeployment_granted_level",
                                       "modeldeployment"))
        .with_row(b.dashboard.Row("Requests"))
        .with_panel(_series(b, "Requests by outcome", "reqps",
                            (f"sum by (outcome) (rate(ray_ndif_requests_total{{{selector}}}[{RATE}]))",
                             "{{outcome}}")))
        .with_panel(_series(b, "Execution time p50 / p99", "s", *[
            (f"histogram_quantile({q}, sum by (le) (rate(ray_ndif_request_seconds_bucket{{{selector}}}[{RATE}])))",
             f"p{int(q * 100)}") for q in (0.5, 0.99)]))
        .with_panel(_series(b, "Queue depth (per replica, max)", "none",
                            (f"max by (model) (ray_ndif_queue_depth{{{selector}}})", "{{model}}")))
        .with_panel(_series(b, "Errors by kind", "reqps",
                            (f"sum by (kind) (rate(ray_ndif_request_errors_total{{{selector}}}[{RATE}]))",
                             "{{kind}}")))
        .with_panel(_series(b, "Gateway refusals by reason", "reqps",
                            (f"sum by (reason) (rate(ray_ndif_gateway_refusals_total{{{selector}}}[{RATE}]))",
                             "{{reason}}")))
        .with_panel(_series(b, "Payload and result bytes", "Bps",
                            (f"sum(rate(ray_ndif_request_bytes_total{{{selector}}}[{RATE}]))", "in"),
                            (f"sum(rate(ray_ndif_result_bytes_total{{{selector}}}[{RATE}]))", "out")))
        .with_row(b.dashboard.Row("Levels and memory"))
        .with_panel(_series(b, "Load / activation time (p90 by source)", "s",
                            (f"histogram_quantile(0.9, sum by (le, source) "
                             f"(increase(ray_ndif_model_load_seconds_bucket{{{selector}}}[1h])))", "{{source}}")))
        .with_panel(_series(b, "Wanted / granted level (2 Hot, 1 Warm, 0 Cold)", "none",
                            ('max by (modeldeployment) (ndif_operator_modeldeployment_wanted_level'
                             '{modeldeployment=~"$modeldeployment"})', "{{modeldeployment}} wanted"),
                            ('max by (modeldeployment) (ndif_operator_modeldeployment_granted_level'
                             '{modeldeployment=~"$modeldeployment"})', "{{modeldeployment}} granted")))
        .with_panel(_series(b, "GPU memory per replica", "bytes",
                            ('max by (modeldeployment) (ndif_operator_modeldeployment_gpu_memory_bytes'
                             '{modeldeployment=~"$modeldeployment"})', "{{modeldeployment}}")))
        .with_panel(_series(b, "Serve application status (6 RUNNING)", "none",
                            ("max by (application) (ray_serve_application_status)", "{{application}}")))
    )


def operator(b: Any) -> Any:
    return (
        _base(b, "ndif-operator", "NDIF / Operator", "Planner passes, durations, RayService patches, failures.")
        .with_panel(_stat(b, "Operator up", 'max(up{ndif_component="operator"}) or vector(0)'))
        .with_panel(_stat(b, "Status writes (1h)", "sum(increase(ndif_operator_status_writes_total[1h]))"))
        .with_panel(_series(b, "Planner passes by result", "ops",
                            (f"sum by (result) (rate(ndif_operator_reconcile_total[{RATE}]))", "{{result}}")))
        .with_panel(_series(b, "Pass duration p50 / p99", "s", *[
            (f"histogram_quantile({q}, sum by (le) (rate(ndif_operator_reconcile_duration_seconds_bucket[{RATE}])))",
             f"p{int(q * 100)}") for q in (0.5, 0.99)]))
        .with_panel(_series(b, "plan() duration p99", "s",
                            (f"histogram_quantile(0.99, sum by (le) "
                             f"(rate(ndif_operator_plan_duration_seconds_bucket[{RATE}])))", "p99")))
        .with_panel(_series(b, "RayService patches by result", "ops",
                            (f"sum by (result) (rate(ndif_operator_rayservice_patches_total[{RATE}]))",
                             "{{result}}")))
        .with_panel(_series(b, "Kubernetes API errors by status (0: unreachable)", "ops",
                            (f"sum by (code) (rate(ndif_operator_api_errors_total[{RATE}]))", "{{code}}")))
    )


def dashboards() -> dict[str, dict[str, Any]]:
    """file stem → dashboard JSON model."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder

    b = _builders()
    built = {"fleet": fleet(b), "model": per_model(b), "operator": operator(b)}
    return {name: json.loads(JSONEncoder(sort_keys=True).encode(d.build())) for name, d in built.items()}


def exprs(model: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard JSON (panels' targets and query variables)."""
    found = [t["expr"] for p in model.get("panels", []) for t in p.get("targets", []) if "expr" in t]
    for variable in model.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            found.append(query.get("query", "") if isinstance(query, dict) else str(query))
    return found

"""The RBAC is generated from the operator's declared API calls (ndif_operator/operator/rbac.py)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml
from operator_harness import (
    NAMESPACE,
    OPERATOR_NAMESPACE,
    Cluster,
    OperatorThread,
    model_deployment,
    ray_service,
    wait_for,
)

from ndif_operator.operator import rbac
from ndif_operator.operator.kube import KubeApi


def test_generated_rbac_is_committed() -> None:
    assert rbac.main(check=True) == 0, "run `ndif-operator generate`"


def test_generate_check_fails_on_drift(tmp_path: Path) -> None:
    path = tmp_path / "rbac.yaml"
    assert rbac.main(check=True, path=path) == 1
    assert rbac.main(check=False, path=path) == 0 and rbac.main(check=True, path=path) == 0
    path.write_text(path.read_text() + "# edited\n")
    assert rbac.main(check=True, path=path) == 1


def test_every_kube_api_method_is_declared() -> None:
    # KubeApi's own methods only: nnsight, once imported by an earlier test, mounts `save` on object.
    methods = {name for name, member in vars(KubeApi).items() if inspect.isfunction(member)
               and not name.startswith("_") and name not in ("close",)} - {"connect"}
    declared = {call.caller for call in rbac.API_CALLS if not call.caller.startswith("kopf.")}
    assert methods == declared, "declare each KubeApi method in rbac.API_CALLS (and drop removed ones)"


def test_the_file_holds_a_cluster_role_and_an_own_namespace_role_without_wildcards() -> None:
    cluster_role, own = yaml.safe_load_all(rbac.RBAC_FILE.read_text())
    assert (cluster_role["kind"], own["kind"]) == ("ClusterRole", "Role") and "namespace" not in own["metadata"]
    assert {r["resources"][0] for r in own["rules"]} == {
        "calendarschedules", "calendarschedules/status", "configmaps", "jobs", "pods", "secrets"}
    assert {r["resources"][0] for r in cluster_role["rules"]} == {
        "events", "nodes", "modeldeployments", "modeldeployments/status", "rayservices"}
    for rule in cluster_role["rules"] + own["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]


# One call of each KubeApi method: its requests must be exactly its declaration (no more, no less).
_OWN_JOB = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"},
            "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}}}}
_EVENT = {"apiVersion": "v1", "kind": "Event", "metadata": {"generateName": "e."}, "reason": "Test",
          "involvedObject": {"kind": "RayService", "name": "ndif", "namespace": NAMESPACE}}
async def _drain(events: AsyncIterator[Any]) -> None:
    async for _ in events:
        pass


METHOD_CALLS: dict[str, Callable[[KubeApi], Awaitable[Any]]] = {
    "list_model_deployments": lambda api: api.list_model_deployments([]),
    "patch_metadata": lambda api: api.patch_metadata(NAMESPACE, "m", {"annotations": {"a": "b"}}),
    "replace_status": lambda api: api.replace_status(NAMESPACE, "m", {"phase": "Pending"}),
    "get_ray_service": lambda api: api.get_ray_service(NAMESPACE, "ndif"),
    "patch_serve_config": lambda api: api.patch_serve_config(NAMESPACE, "ndif", "{}"),
    "list_events": lambda api: api.list_events(NAMESPACE, "involvedObject.name=ndif"),
    "post_event": lambda api: api.post_event(NAMESPACE, _EVENT),
    "list_nodes": lambda api: api.list_nodes(),
    "get_config_map": lambda api: api.get_config_map(OPERATOR_NAMESPACE, "c"),
    "create_config_map": lambda api: api.create_config_map(OPERATOR_NAMESPACE, "c", {"k": "v"}),
    "patch_config_map_data": lambda api: api.patch_config_map_data(OPERATOR_NAMESPACE, "c", {"k": "w"}, ""),
    "watch_config_map": lambda api: _drain(api.watch_config_map(OPERATOR_NAMESPACE, "c", "1", 1)),
    "read_secret": lambda api: api.read_secret(OPERATOR_NAMESPACE, "s"),
    "get_job": lambda api: api.get_job(OPERATOR_NAMESPACE, "j"),
    "create_job": lambda api: api.create_job(OPERATOR_NAMESPACE, _OWN_JOB),
    "list_pods": lambda api: api.list_pods(OPERATOR_NAMESPACE, "job-name=j"),
    "list_calendar_schedules": lambda api: api.list_calendar_schedules(OPERATOR_NAMESPACE),
    "watch_calendar_schedules": lambda api: _drain(api.watch_calendar_schedules(OPERATOR_NAMESPACE, "1", 1)),
    "replace_calendar_schedule_status": lambda api: api.replace_calendar_schedule_status(
        OPERATOR_NAMESPACE, "cal", {"message": "read"}),
}


def _requested(entries: list[Any]) -> set[tuple[str, str, str, str]]:
    """(verb, group, resource[/subresource], namespace) of resource requests."""
    return {(e.attrs.verb, e.attrs.api_group, e.attrs.resource_path, e.attrs.namespace)
            for e in entries if e.attrs is not None and e.attrs.resource_request}


def _declared(caller: str) -> set[tuple[str, str, str, str]]:
    namespace = {rbac.Scope.WATCHED: NAMESPACE, rbac.Scope.OWN: OPERATOR_NAMESPACE, rbac.Scope.CLUSTER: ""}
    return {(verb, call.group, call.resource, namespace[call.scope])
            for call in rbac.API_CALLS if call.caller == caller for verb in call.verbs}


def test_each_kube_api_method_makes_exactly_its_declared_requests(cluster: Cluster) -> None:
    assert set(METHOD_CALLS) == {c.caller for c in rbac.API_CALLS if not c.caller.startswith("kopf.")}
    cluster.emu.create_sync(ray_service())
    cluster.emu.create_sync(model_deployment("m", "org/m"))
    cluster.emu.create_sync({"apiVersion": "ndif.dev/v1alpha1", "kind": "CalendarSchedule",
                             "metadata": {"name": "cal", "namespace": OPERATOR_NAMESPACE},
                             "spec": {"calendarId": "c", "credentialsSecret": {"name": "s"}}})

    async def run_all() -> dict[str, set[tuple[str, str, str, str]]]:
        api = KubeApi.connect(cluster.login())
        seen = {}
        try:
            for name, call in METHOD_CALLS.items():
                before = len(cluster.emu.log)
                await call(api)
                user = cluster.operator_identity.user
                seen[name] = _requested([e for e in list(cluster.emu.log)[before:] if e.user == user])
        finally:
            await api.close()
        return seen

    seen = asyncio.run(run_all())
    for name, requests in seen.items():
        declared = _declared(name)
        if name == "list_model_deployments":  # cluster-wide: the list spans all watched namespaces
            declared = {(v, g, r, "") for v, g, r, _ in declared}
        assert requests == declared, f"KubeApi.{name}: made {requests}, declared {declared}"
    refused = [e for e in cluster.operator_requests() if e.status in (401, 403)]
    assert not refused, refused


def test_the_running_operator_makes_only_declared_requests(cluster: Cluster) -> None:
    running = OperatorThread(cluster).start()
    try:
        cluster.emu.create_sync(ray_service())
        cluster.emu.create_sync(model_deployment("m", "org/m-8g"))
        wait_for(lambda: cluster.condition("m", "Placed").get("status") == "True", what="Placed")
    finally:
        running.stop()  # watches are logged when they end
    made = {(v, g, r) for v, g, r, _ in _requested(cluster.operator_requests())}
    kopf_calls = {(verb, c.group, c.resource) for c in rbac.API_CALLS if c.caller == "kopf.watch" for verb in c.verbs}
    assert kopf_calls <= made
    granted = {(verb, c.group, c.resource) for c in rbac.API_CALLS for verb in c.verbs}
    assert made <= granted, made - granted


def test_the_operator_runs_namespaced_with_the_namespaced_chart_rbac(tmp_path: Path) -> None:
    from kube_emulator import KubeEmulator
    from operator_harness import MD_TYPE

    emulator = KubeEmulator([MD_TYPE])
    emulator.start()
    try:
        emulator.create_sync({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        cluster = Cluster(emulator, tmp_path, namespaces=(NAMESPACE,))
        running = OperatorThread(cluster).start()
        try:
            emulator.create_sync(ray_service())
            emulator.create_sync(model_deployment("m", "org/m-8g"))
            wait_for(lambda: cluster.condition("m", "Placed").get("status") == "True", what="Placed")
        finally:
            running.stop()  # fails on any 401/403
        assert all(e.attrs is None or e.attrs.namespace in (NAMESPACE, OPERATOR_NAMESPACE)
                   for e in cluster.operator_requests() if e.attrs is not None and e.attrs.resource_request)
    finally:
        emulator.stop()

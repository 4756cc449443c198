"""The RBAC is generated from the operator's declared API calls (ndif_operator/operator/rbac.py)."""

from __future__ import annotations

import inspect
from pathlib import Path

import yaml

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
    methods = {name for name, member in inspect.getmembers(KubeApi, inspect.isfunction)
               if not name.startswith("_") and name not in ("close",)} - {"connect"}
    declared = {call.caller for call in rbac.API_CALLS if not call.caller.startswith("kopf.")}
    assert methods == declared, "declare each KubeApi method in rbac.API_CALLS (and drop removed ones)"


def test_the_file_holds_a_cluster_role_and_an_own_namespace_role_without_wildcards() -> None:
    cluster_role, own = yaml.safe_load_all(rbac.RBAC_FILE.read_text())
    assert (cluster_role["kind"], own["kind"]) == ("ClusterRole", "Role") and "namespace" not in own["metadata"]
    assert {r["resources"][0] for r in own["rules"]} == {"configmaps", "jobs", "pods", "secrets"}
    assert {r["resources"][0] for r in cluster_role["rules"]} == {
        "events", "nodes", "modeldeployments", "modeldeployments/status", "rayservices"}
    for rule in cluster_role["rules"] + own["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]

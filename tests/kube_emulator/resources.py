"""What the emulator serves: resource types, their discovery entries and validation hooks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Validator = Callable[[dict[str, Any], dict[str, Any] | None], list[str]]
Defaulter = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class ResourceType:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    singular: str = ""
    short_names: tuple[str, ...] = ()
    status_subresource: bool = False
    scale_paths: tuple[str, str] | None = None  # (specReplicasPath, statusReplicasPath)
    printer_columns: tuple[dict[str, Any], ...] = ()
    validate: Validator | None = None
    default: Defaulter | None = None  # schema defaults, persisted like the API server does
    categories: tuple[str, ...] = ()
    # Kubernetes bumps metadata.generation on spec changes only for types with a status subresource.
    verbs: tuple[str, ...] = ("create", "delete", "get", "list", "patch", "update", "watch")

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.group, self.version, self.plural)

    def discovery_entries(self) -> list[dict[str, Any]]:
        main: dict[str, Any] = {
            "name": self.plural,
            "singularName": self.singular or self.kind.lower(),
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": list(self.verbs),
        }
        if self.short_names:
            main["shortNames"] = list(self.short_names)
        if self.categories:
            main["categories"] = list(self.categories)
        entries = [main]
        if self.status_subresource:
            entries.append({"name": f"{self.plural}/status", "singularName": "", "namespaced": self.namespaced,
                            "kind": self.kind, "verbs": ["get", "patch", "update"]})
        if self.scale_paths is not None:
            entries.append({"name": f"{self.plural}/scale", "singularName": "", "namespaced": self.namespaced,
                            "group": "autoscaling", "version": "v1", "kind": "Scale",
                            "verbs": ["get", "patch", "update"]})
        return entries


def from_crd(crd: dict[str, Any], validate: Validator | None = None,
             default: Defaulter | None = None) -> ResourceType:
    """The served type of a CustomResourceDefinition's storage version."""
    spec = crd["spec"]
    version = next(v for v in spec["versions"] if v.get("storage"))
    subresources = version.get("subresources", {})
    scale = subresources.get("scale")
    return ResourceType(
        group=spec["group"],
        version=version["name"],
        plural=spec["names"]["plural"],
        kind=spec["names"]["kind"],
        singular=spec["names"].get("singular", ""),
        short_names=tuple(spec["names"].get("shortNames", ())),
        categories=tuple(spec["names"].get("categories", ())),
        namespaced=spec.get("scope", "Namespaced") == "Namespaced",
        status_subresource="status" in subresources,
        scale_paths=(scale["specReplicasPath"], scale["statusReplicasPath"]) if scale else None,
        printer_columns=tuple(version.get("additionalPrinterColumns", ())),
        validate=validate,
        default=default,
    )


RAY_SERVICE = ResourceType(
    group="ray.io", version="v1", plural="rayservices", kind="RayService", status_subresource=True,
    printer_columns=(
        {"name": "Service Status", "type": "string", "jsonPath": ".status.serviceStatus"},
        {"name": "Num Serve Endpoints", "type": "string", "jsonPath": ".status.numServeEndpoints"},
    ),
)
EVENTS = ResourceType(group="", version="v1", plural="events", kind="Event", short_names=("ev",))
NAMESPACES = ResourceType(group="", version="v1", plural="namespaces", kind="Namespace", namespaced=False)
NODES = ResourceType(group="", version="v1", plural="nodes", kind="Node", namespaced=False,
                     status_subresource=True)
CRDS = ResourceType(group="apiextensions.k8s.io", version="v1", plural="customresourcedefinitions",
                    kind="CustomResourceDefinition", namespaced=False, status_subresource=True)
CONFIG_MAPS = ResourceType(group="", version="v1", plural="configmaps", kind="ConfigMap", short_names=("cm",))
SECRETS = ResourceType(group="", version="v1", plural="secrets", kind="Secret")
# Jobs and Pods are stored only: no controller or kubelet runs them (a test plays that part).
JOBS = ResourceType(group="batch", version="v1", plural="jobs", kind="Job", status_subresource=True)
PODS = ResourceType(group="", version="v1", plural="pods", kind="Pod", short_names=("po",),
                    status_subresource=True)
SERVICE_ACCOUNTS = ResourceType(group="", version="v1", plural="serviceaccounts", kind="ServiceAccount",
                                short_names=("sa",))
_RBAC = "rbac.authorization.k8s.io"
ROLES = ResourceType(group=_RBAC, version="v1", plural="roles", kind="Role")
CLUSTER_ROLES = ResourceType(group=_RBAC, version="v1", plural="clusterroles", kind="ClusterRole", namespaced=False)
ROLE_BINDINGS = ResourceType(group=_RBAC, version="v1", plural="rolebindings", kind="RoleBinding")
CLUSTER_ROLE_BINDINGS = ResourceType(group=_RBAC, version="v1", plural="clusterrolebindings",
                                     kind="ClusterRoleBinding", namespaced=False)
RBAC_TYPES = (ROLES, CLUSTER_ROLES, ROLE_BINDINGS, CLUSTER_ROLE_BINDINGS)

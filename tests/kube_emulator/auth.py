"""Authentication and RBAC authorisation as the API server does them.

`attributes()` is Kubernetes' RequestInfo (verb, API group, resource, subresource, namespace, name
from the method and path); `Authorizer` evaluates the stored Roles, ClusterRoles, RoleBindings and
ClusterRoleBindings (rbac.authorization.k8s.io/v1) like the RBAC authorizer: a request is allowed
when any rule bound to the user, one of its groups or its service account matches; `system:masters`
may do anything; any authenticated identity may read the discovery and version paths (the
default `system:discovery` and `system:public-info-viewer` bindings).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

Obj = dict[str, Any]

AUTHENTICATED = "system:authenticated"
MASTERS = "system:masters"
# system:discovery + system:public-info-viewer, bound to every authenticated identity by default.
_PUBLIC_PATHS = ("/api", "/api/*", "/apis", "/apis/*", "/openapi", "/openapi/*", "/version", "/version/",
                 "/healthz", "/livez", "/readyz")


@dataclass(frozen=True)
class Identity:
    user: str
    groups: tuple[str, ...] = (AUTHENTICATED,)


ADMIN = Identity("kubernetes-admin", (MASTERS, AUTHENTICATED))


def service_account(namespace: str, name: str) -> Identity:
    return Identity(f"system:serviceaccount:{namespace}:{name}",
                    ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", AUTHENTICATED))


@dataclass(frozen=True)
class Attributes:
    verb: str
    path: str
    resource_request: bool
    api_group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""

    @property
    def resource_path(self) -> str:
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "GET": "get", "HEAD": "get", "DELETE": "delete"}


def attributes(method: str, path: str, query: Any) -> Attributes:
    """Kubernetes' RequestInfo for `method path?query` (only the parts RBAC reads)."""
    verb = _VERBS.get(method, method.lower())
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 3:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 4:
        group, rest = parts[1], parts[3:]
    else:
        return Attributes(verb=method.lower(), path=path, resource_request=False)  # non-resource: HTTP verb
    namespace = ""
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    elif rest[0] == "namespaces" and len(rest) == 2:
        namespace = rest[1]  # a Namespace is its own namespace for RBAC
    resource, name, subresource = rest[0], rest[1] if len(rest) > 1 else "", rest[2] if len(rest) > 2 else ""
    if not name:
        if verb == "get":
            verb = "watch" if query.get("watch") in ("true", "1", "True") else "list"
        elif verb == "delete":
            verb = "deletecollection"
    elif verb == "get" and query.get("watch") in ("true", "1", "True"):
        verb = "watch"
    return Attributes(verb=verb, path=path, resource_request=True, api_group=group, resource=resource,
                      subresource=subresource, namespace=namespace, name=name)


def _rule_allows(rule: Obj, attrs: Attributes) -> bool:
    verbs = rule.get("verbs") or []
    if "*" not in verbs and attrs.verb not in verbs:
        return False
    if not attrs.resource_request:
        return any(u == attrs.path or (u.endswith("*") and attrs.path.startswith(u[:-1]))
                   for u in rule.get("nonResourceURLs") or [])
    groups = rule.get("apiGroups")
    if groups is None or ("*" not in groups and attrs.api_group not in groups):
        return False
    wanted = attrs.resource_path
    resources = rule.get("resources") or []
    if not any(r == "*" or r == wanted or (attrs.subresource and r == f"*/{attrs.subresource}")
               or (r.endswith("/*") and r[:-2] == attrs.resource and attrs.subresource) for r in resources):
        return False
    names = rule.get("resourceNames") or []
    return not names or attrs.name in names


def _subject_matches(subject: Obj, identity: Identity) -> bool:
    kind = subject.get("kind")
    if kind == "User":
        return bool(subject.get("name") == identity.user)
    if kind == "Group":
        return subject.get("name") in identity.groups
    if kind == "ServiceAccount":
        return identity.user == f"system:serviceaccount:{subject.get('namespace')}:{subject.get('name')}"
    return False


class Authorizer:
    """RBAC over the stored objects; `lookup(kind, namespace)` lists them (namespace "" for cluster)."""

    def __init__(self, lookup: Callable[[str, str], Iterable[Obj]]) -> None:
        self._lookup = lookup

    def _role_rules(self, ref: Obj, namespace: str) -> list[Obj]:
        kind, name = ref.get("kind"), ref.get("name")
        for role in self._lookup(str(kind), namespace if kind == "Role" else ""):
            if role["metadata"]["name"] == name:
                return list(role.get("rules") or [])
        return []  # a binding to a missing role grants nothing

    def allowed(self, identity: Identity, attrs: Attributes) -> bool:
        if MASTERS in identity.groups:
            return True
        if not attrs.resource_request and AUTHENTICATED in identity.groups and any(
                fnmatchcase(attrs.path, pattern) for pattern in _PUBLIC_PATHS) and attrs.verb == "get":
            return True
        bindings: list[tuple[Obj, str]] = [(b, "") for b in self._lookup("ClusterRoleBinding", "")]
        if attrs.resource_request and attrs.namespace:
            bindings += [(b, attrs.namespace) for b in self._lookup("RoleBinding", attrs.namespace)]
        for binding, namespace in bindings:
            if not any(_subject_matches(s, identity) for s in binding.get("subjects") or []):
                continue
            if any(_rule_allows(rule, attrs) for rule in self._role_rules(binding.get("roleRef") or {}, namespace)):
                return True
        return False


def forbidden(identity: Identity, attrs: Attributes) -> tuple[str, Obj]:
    """The API server's 403 message and Status details."""
    if not attrs.resource_request:
        return (f'forbidden: User "{identity.user}" cannot {attrs.verb} path "{attrs.path}"', {})
    qualified = f"{attrs.resource}.{attrs.api_group}" if attrs.api_group else attrs.resource
    subject = f'{qualified} "{attrs.name}"' if attrs.name else qualified
    scope = f'in the namespace "{attrs.namespace}"' if attrs.namespace else "at the cluster scope"
    message = (f'{subject} is forbidden: User "{identity.user}" cannot {attrs.verb} resource '
               f'"{attrs.resource_path}" in API group "{attrs.api_group}" {scope}')
    details: Obj = {"group": attrs.api_group, "kind": attrs.resource}
    if attrs.name:
        details["name"] = attrs.name
    return message, details

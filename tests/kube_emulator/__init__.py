"""A faithful-enough Kubernetes API server for the operator's tests (see tests/README.md)."""

from kube_emulator.auth import ADMIN, Identity, service_account
from kube_emulator.resources import CONFIG_MAPS, JOBS, PODS, RAY_SERVICE, SECRETS, ResourceType, from_crd
from kube_emulator.server import ApiError, KubeEmulator, merge_patch

__all__ = ["ADMIN", "CONFIG_MAPS", "JOBS", "PODS", "RAY_SERVICE", "SECRETS", "ApiError", "Identity", "KubeEmulator",
           "ResourceType", "from_crd", "merge_patch", "service_account"]

"""Embedded mode: the operator's evaluate → plan → render on this machine, served by a local Ray.

`ndif-operator local <manifests>` (ndif_operator.commands.local) is the entry point; `LocalMode`
is the same thing as a context manager for scripts, the demo and tests.
"""

from ndif_operator.local.embedded import LocalMode, LocalSettings
from ndif_operator.local.ray_head import LocalRayHead, RayHeadSpec, RayPorts

__all__ = ["LocalMode", "LocalRayHead", "LocalSettings", "RayHeadSpec", "RayPorts"]

"""The placement planner (see docs/placement.md)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from ndif_operator.planning.types import Inventory, PlacementRequest, Plan


def plan(inventory: Inventory, requests: Sequence[PlacementRequest], *, now: datetime) -> Plan:
    """Grant each request a level and a placement; deterministic and stable."""
    raise NotImplementedError("planner under construction")

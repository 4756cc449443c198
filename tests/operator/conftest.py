"""Fixtures of the operator tests (the harness lives in operator_harness.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kube_emulator import KubeEmulator
from operator_harness import CALENDAR_TYPE, MD_TYPE, NAMESPACE, Cluster, FakeGateway, OperatorThread
from scheduling.fake_calendar import BOOKINGS, FakeGoogleCalendar


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    emulator = KubeEmulator([MD_TYPE, CALENDAR_TYPE], bookmark_interval=5.0)
    emulator.start()
    emulator.create_sync({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    try:
        yield Cluster(emulator, tmp_path)
    finally:
        emulator.stop()


@pytest.fixture
def operator(cluster: Cluster) -> Iterator[OperatorThread]:
    running = OperatorThread(cluster).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def google() -> Iterator[FakeGoogleCalendar]:
    """A fake Google Calendar over HTTP with the (empty) bookings calendar."""
    fake = FakeGoogleCalendar()
    fake.start()
    fake.calendar(BOOKINGS)
    yield fake
    fake.stop()


@pytest.fixture
def gateway() -> Iterator[FakeGateway]:
    running = FakeGateway().start()
    try:
        yield running
    finally:
        running.stop()

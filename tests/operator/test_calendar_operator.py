"""Calendar booking end to end: real Kopf operator logged in with the chart's RBAC, real kubectl,
the real Google client against the local Calendar fake over HTTP, wall-clock time."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

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
from scheduling.fake_calendar import BOOKINGS as CAL
from scheduling.fake_calendar import FakeGoogleCalendar


def test_a_booked_model_is_hot_for_its_event_and_kubectl_shows_it(cluster: Cluster, google: FakeGoogleCalendar) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    end = now + timedelta(hours=1)
    google.add_event(CAL, "b1", "<div>model: ml/big</div>", now - timedelta(minutes=1), end)
    cluster.emu.create_sync(ray_service(groups=(("gpu", 1, 1, "80Gi"),)))
    manifests = [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "gcal", "namespace": OPERATOR_NAMESPACE},
         "stringData": {"service-account.json": json.dumps(google.service_account())}},
        model_deployment("big", "org/big-70g", level="Warm"),
        model_deployment("mid", "org/mid-60g", priority=10),
        {"apiVersion": "ndif.dev/v1alpha1", "kind": "CalendarSchedule",
         "metadata": {"name": "bookings", "namespace": OPERATOR_NAMESPACE},
         "spec": {"calendarId": CAL, "credentialsSecret": {"name": "gcal"}, "namespace": NAMESPACE,
                  "endpoint": google.url, "pollSeconds": 10}},
    ]
    running = OperatorThread(cluster).start()
    try:
        cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(manifests))
        wait_for(lambda: cluster.condition("big", "Scheduled").get("reason") == "ScheduledDedicated",
                 what="the booking in force")
        wait_for(lambda: (cluster.md("big") or {}).get("status", {}).get("level") == "Hot", what="big Hot")
        assert ((cluster.md("mid") or {}).get("status") or {}).get("level") != "Hot"
        table = cluster.kubectl("get", "md", "-n", NAMESPACE).stdout
        assert "BOOKED-UNTIL" in table.splitlines()[0]
        assert end.isoformat().replace("+00:00", "Z") in next(line for line in table.splitlines()
                                                              if line.startswith("big "))
        schedules = cluster.kubectl("get", "calsched", "-n", OPERATOR_NAMESPACE).stdout
        assert "CalendarRead" in schedules and "True" in schedules

        google.remove_event(CAL, "b1")  # the booker cancels: read at the next poll
        wait_for(lambda: cluster.condition("big", "Scheduled").get("reason") == "ScheduleEnded",
                 timeout=60, what="the booking's end")
        wait_for(lambda: (cluster.md("mid") or {}).get("status", {}).get("level") == "Hot", what="mid Hot again")
        assert (cluster.md("big") or {})["spec"]["level"] == "Warm"  # the calendar never edits the spec
    finally:
        running.stop()  # fails on any 401/403: the generated RBAC covers the calendar's calls

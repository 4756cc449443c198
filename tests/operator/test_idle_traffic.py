"""bench/idle_traffic.py's scenario as a test: an idle operator sends at most 2 requests a minute."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_ten_idle_minutes_after_twelve_events_cost_at_most_two_requests_a_minute() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import idle_traffic
    finally:
        sys.path.remove(str(BENCH))
    result = idle_traffic._run(idle_traffic._scenario(baseline=False))
    assert result.minutes == 10 and result.per_minute <= 2, result
    assert result.writes == 0 and result.stale_fields == 0, result

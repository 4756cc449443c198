from __future__ import annotations

from collections.abc import Iterator

import pytest

from scheduling.fake_calendar import FakeGoogleCalendar


@pytest.fixture
def google() -> Iterator[FakeGoogleCalendar]:
    fake = FakeGoogleCalendar(page_size=2)  # small pages: every list exercises pagination
    fake.start()
    yield fake
    fake.stop()

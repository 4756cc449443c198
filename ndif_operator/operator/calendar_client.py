"""Google Calendar v3 over google-api-python-client: list a calendar's events, colour one.

The client is built from the discovery document that ships in the package (no network for it),
with a service-account key read from a Secret. `endpoint` points it elsewhere (a proxy, or the
tests' local fake of the Calendar API); the OAuth token endpoint is the one the key names.
Calls are blocking (httplib2): the operator runs them in a worker thread. Every failure becomes a
`CalendarError` with the schedule's condition reason and a message an admin can act on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httplib2
from google.auth.exceptions import GoogleAuthError, RefreshError, TransportError
from google.oauth2 import service_account
from google_auth_httplib2 import AuthorizedHttp
from googleapiclient.discovery import build
from googleapiclient.errors import HttpError

from ndif_operator.api.calendar import CALENDAR_SCOPE, SyncReason

_PAGE_SIZE = 250
_MAX_PAGES = 40  # 10,000 events in the look-ahead window is far past any real calendar


class CalendarError(Exception):
    def __init__(self, reason: SyncReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    @property
    def retryable(self) -> bool:
        """Whether the same call can succeed later without anyone changing anything."""
        return self.reason == SyncReason.CALENDAR_UNAVAILABLE


@dataclass(frozen=True, slots=True)
class EventPage:
    """Everything `events.list` returned for a window, and the calendar's own time zone."""

    items: tuple[dict[str, Any], ...]
    time_zone: str | None


def _http_error(exc: HttpError, calendar_id: str) -> CalendarError:
    status = int(exc.status_code or 0)
    detail = exc.reason or ""
    if status in (401, 403):
        if "rateLimit" in str(exc.content or b"") or "quota" in detail.lower():
            return CalendarError(SyncReason.CALENDAR_UNAVAILABLE, f"Google Calendar is rate-limiting us: {detail}")
        return CalendarError(
            SyncReason.FORBIDDEN,
            f"Google refused access to calendar {calendar_id!r} ({status}: {detail}); share the calendar with the "
            "service account's e-mail (permission: make changes to events)",
        )
    if status == 404:
        return CalendarError(SyncReason.CALENDAR_NOT_FOUND, f"calendar {calendar_id!r} does not exist (404)")
    return CalendarError(SyncReason.CALENDAR_UNAVAILABLE, f"Google Calendar answered {status}: {detail}")


def credentials_from_json(raw: bytes | str) -> service_account.Credentials:
    """A service-account key (the JSON Google Cloud gives out) → credentials for the calendar scope."""
    try:
        info = json.loads(raw)
        if not isinstance(info, dict) or info.get("type") != "service_account":
            raise ValueError("not a service-account key (its `type` must be `service_account`)")
        credentials: service_account.Credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
            info, scopes=[CALENDAR_SCOPE]
        )
        return credentials
    except (ValueError, KeyError) as exc:
        raise CalendarError(SyncReason.CREDENTIALS_INVALID, f"the service-account key cannot be used: {exc}") from exc


class CalendarClient:
    """One calendar API client per credentials; not thread-safe (httplib2), use from one thread."""

    def __init__(self, credentials: service_account.Credentials, *, endpoint: str | None = None,
                 timeout_seconds: float = 20.0) -> None:
        http = AuthorizedHttp(credentials, http=httplib2.Http(timeout=timeout_seconds))
        options = {"api_endpoint": endpoint.rstrip("/") + "/calendar/v3/"} if endpoint else None
        self._service = build(
            "calendar", "v3", http=http, static_discovery=True, cache_discovery=False, client_options=options
        )

    def _execute(self, request: Any, calendar_id: str) -> dict[str, Any]:
        try:
            result: dict[str, Any] = request.execute(num_retries=0)
            return result
        except HttpError as exc:
            raise _http_error(exc, calendar_id) from exc
        except RefreshError as exc:
            # Google answers a bad key or a disabled account at its token endpoint.
            transient = exc.retryable if hasattr(exc, "retryable") else False
            reason = SyncReason.CALENDAR_UNAVAILABLE if transient else SyncReason.CREDENTIALS_INVALID
            raise CalendarError(reason, f"Google refused the service-account key: {exc}") from exc
        except (TimeoutError, TransportError, httplib2.HttpLib2Error, OSError) as exc:
            raise CalendarError(SyncReason.CALENDAR_UNAVAILABLE, f"cannot reach Google Calendar: {exc}") from exc
        except GoogleAuthError as exc:
            message = f"the service-account key cannot be used: {exc}"
            raise CalendarError(SyncReason.CREDENTIALS_INVALID, message) from exc

    def list_events(self, calendar_id: str, time_min: datetime, time_max: datetime) -> EventPage:
        """Single events (recurring ones expanded) that overlap [time_min, time_max)."""
        events = self._service.events()
        request = events.list(
            calendarId=calendar_id,
            timeMin=time_min.isoformat(),
            timeMax=time_max.isoformat(),
            singleEvents=True,
            orderBy="startTime",
            showDeleted=False,
            maxResults=_PAGE_SIZE,
        )
        items: list[dict[str, Any]] = []
        time_zone: str | None = None
        for _ in range(_MAX_PAGES):
            if request is None:
                break
            page = self._execute(request, calendar_id)
            items.extend(page.get("items") or [])
            time_zone = time_zone or page.get("timeZone")
            request = events.list_next(request, page)
        return EventPage(tuple(items), time_zone)

    def set_color(self, calendar_id: str, event_id: str, color_id: str) -> None:
        """Colour one event (an instance of a recurring event is coloured alone)."""
        request = self._service.events().patch(calendarId=calendar_id, eventId=event_id, body={"colorId": color_id})
        self._execute(request, calendar_id)

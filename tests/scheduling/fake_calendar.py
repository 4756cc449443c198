"""A local fake of the Google Calendar v3 API and Google's OAuth token endpoint, over real HTTP.

The real `google-api-python-client` talks to it (built from its shipped discovery document, with
`api_endpoint` pointed here), and real service-account credentials sign their JWT with a key this
fake generated, so the token exchange, the bearer tokens and the calendar's sharing are all
checked the way Google checks them. What it implements: `POST /token` (JWT bearer grant),
`events.list` (timeMin/timeMax overlap, `singleEvents` expansion of RRULE recurrences, start-time
order, pagination), `events.patch`, per-calendar sharing (403 for an account it is not shared
with), 404 for unknown calendars, and fault injection. Everything else answers 404.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dateutil.rrule import rrulestr
from google.auth import jwt


@dataclass
class FakeCalendarData:
    time_zone: str = "UTC"
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    shared_with: set[str] = field(default_factory=set)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # instance id → patched fields


@dataclass
class Fault:
    method: str
    path: re.Pattern[str]
    status: int
    times: int


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _bounds(event: dict[str, Any]) -> tuple[datetime, datetime]:
    def one(v: dict[str, Any]) -> datetime:
        if "dateTime" in v:
            return _parse(v["dateTime"])
        return datetime.fromisoformat(v["date"]).replace(tzinfo=UTC)

    return one(event["start"]), one(event["end"])


# The calendar the operator tests book on (the `google` fixture of tests/operator creates it).
BOOKINGS = "bookings@group.calendar.google.com"


class FakeGoogleCalendar:
    def __init__(self, page_size: int = 250) -> None:
        self.calendars: dict[str, FakeCalendarData] = {}
        self.keys: dict[str, str] = {}  # service-account e-mail → public key PEM
        self.tokens: dict[str, str] = {}  # access token → e-mail
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        self.patches: list[tuple[str, str, dict[str, Any]]] = []
        self.page_size = page_size
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    # --- test-side API ------------------------------------------------------------------------

    def start(self) -> str:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_POST(self) -> None:
                fake._handle(self, "POST")

            def do_PATCH(self) -> None:
                fake._handle(self, "PATCH")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-calendar", daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def service_account(
        self, email: str = "ndif@project.iam.gserviceaccount.com", *, known: bool = True
    ) -> dict[str, str]:
        """A service-account key JSON (as Google Cloud hands it out); `known=False`: Google never issued it."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
        if known:
            self.keys[email] = public
        return {
            "type": "service_account", "project_id": "project", "private_key_id": "k1", "private_key": private,
            "client_email": email, "client_id": "1", "token_uri": f"{self.url}/token",
        }

    def calendar(self, calendar_id: str, *, shared_with: str = "ndif@project.iam.gserviceaccount.com",
                 time_zone: str = "UTC") -> FakeCalendarData:
        data = FakeCalendarData(time_zone=time_zone, shared_with={shared_with})
        self.calendars[calendar_id] = data
        return data

    def add_event(self, calendar_id: str, event_id: str, description: str, start: datetime | str,
                  end: datetime | str, **extra: Any) -> dict[str, Any]:
        def when(v: datetime | str) -> dict[str, str]:
            return {"dateTime": v.isoformat()} if isinstance(v, datetime) else {"date": v}

        event = {"id": event_id, "status": "confirmed", "summary": f"booking {event_id}",
                 "description": description, "start": when(start), "end": when(end), **extra}
        with self._lock:
            self.calendars[calendar_id].events[event_id] = event
        return event

    def remove_event(self, calendar_id: str, event_id: str) -> None:
        with self._lock:
            self.calendars[calendar_id].events.pop(event_id, None)

    def inject(self, method: str, path_regex: str, status: int, times: int = 1) -> None:
        with self._lock:
            self.faults.append(Fault(method, re.compile(path_regex), status, times))

    def color_of(self, calendar_id: str, event_id: str) -> str | None:
        data = self.calendars[calendar_id]
        patched = data.overrides.get(event_id, {})
        return patched.get("colorId") or data.events.get(event_id, {}).get("colorId")

    # --- HTTP -----------------------------------------------------------------------------------

    def _reply(self, handler: BaseHTTPRequestHandler, status: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json; charset=UTF-8")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def _error(self, handler: BaseHTTPRequestHandler, status: int, reason: str, message: str) -> None:
        self._reply(handler, status, {"error": {"code": status, "message": message,
                                                "errors": [{"reason": reason, "message": message}]}})

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urllib.parse.urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        with self._lock:
            self.requests.append((method, url.path))
            for fault in self.faults:
                if fault.times > 0 and fault.method == method and fault.path.search(url.path):
                    fault.times -= 1
                    self._error(handler, fault.status, "backendError", "injected fault")
                    return
        if method == "POST" and url.path == "/token":
            self._token(handler, urllib.parse.parse_qs(body.decode()))
            return
        match = re.fullmatch(r"/calendar/v3/calendars/([^/]+)/events(?:/([^/]+))?", url.path)
        if not match:
            self._error(handler, 404, "notFound", "Not Found")
            return
        email = self.tokens.get((handler.headers.get("Authorization") or "").removeprefix("Bearer "))
        if email is None:
            self._error(handler, 401, "authError", "Invalid Credentials")
            return
        calendar_id = urllib.parse.unquote(match.group(1))
        data = self.calendars.get(calendar_id)
        if data is None:
            self._error(handler, 404, "notFound", "Not Found")
            return
        if email not in data.shared_with:
            self._error(handler, 403, "forbidden", "Forbidden")
            return
        if method == "GET" and match.group(2) is None:
            self._list(handler, data, urllib.parse.parse_qs(url.query))
        elif method == "PATCH" and match.group(2) is not None:
            event_id = urllib.parse.unquote(match.group(2))
            with self._lock:
                data.overrides.setdefault(event_id, {}).update(json.loads(body or b"{}"))
                self.patches.append((calendar_id, event_id, json.loads(body or b"{}")))
            self._reply(handler, 200, {"id": event_id, **data.overrides[event_id]})
        else:
            self._error(handler, 404, "notFound", "Not Found")

    def _token(self, handler: BaseHTTPRequestHandler, form: dict[str, list[str]]) -> None:
        assertion = (form.get("assertion") or [""])[0]
        try:
            claims = jwt.decode(assertion, verify=False)
            public = self.keys[claims["iss"]]
            # google-auth signs for Google's token audience whatever token_uri says, as Google expects.
            jwt.decode(assertion, certs=public, audience="https://oauth2.googleapis.com/token")
        except (KeyError, ValueError) as exc:
            self._reply(handler, 400, {"error": "invalid_grant", "error_description": f"Invalid JWT: {exc}"})
            return
        token = f"tok-{len(self.tokens)}-{claims['iss']}"
        self.tokens[token] = claims["iss"]
        self._reply(handler, 200, {"access_token": token, "expires_in": 3600, "token_type": "Bearer"})

    def _instances(self, data: FakeCalendarData, single: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for event in data.events.values():
            rules = [r for r in event.get("recurrence", []) if r.startswith("RRULE:")]
            if not single or not rules:
                out.append({**event, **data.overrides.get(event["id"], {})})
                continue
            start, end = _bounds(event)
            for when in rrulestr(rules[0].removeprefix("RRULE:"), dtstart=start):
                instance_id = f"{event['id']}_{when.astimezone(UTC).strftime('%Y%m%dT%H%M%SZ')}"
                instance = {k: v for k, v in event.items() if k != "recurrence"}
                instance.update(
                    id=instance_id, recurringEventId=event["id"], originalStartTime={"dateTime": when.isoformat()},
                    start={"dateTime": when.isoformat()}, end={"dateTime": (when + (end - start)).isoformat()},
                )
                out.append({**instance, **data.overrides.get(instance_id, {})})
        return out

    def _list(self, handler: BaseHTTPRequestHandler, data: FakeCalendarData, query: dict[str, list[str]]) -> None:
        single = (query.get("singleEvents") or ["false"])[0] == "true"
        if (query.get("orderBy") or [""])[0] == "startTime" and not single:
            self._error(handler, 400, "invalid", "orderBy=startTime needs singleEvents=true")
            return
        low = _parse(query["timeMin"][0]) if "timeMin" in query else None
        high = _parse(query["timeMax"][0]) if "timeMax" in query else None
        items = []
        for event in self._instances(data, single):
            start, end = _bounds(event)
            if (low is None or end > low) and (high is None or start < high):
                items.append(event)
        items.sort(key=lambda e: _bounds(e)[0])
        offset = int((query.get("pageToken") or ["0"])[0])
        size = min(self.page_size, int((query.get("maxResults") or ["250"])[0]))
        page: dict[str, Any] = {
            "kind": "calendar#events", "timeZone": data.time_zone, "items": items[offset : offset + size]
        }
        if offset + size < len(items):
            page["nextPageToken"] = str(offset + size)
        self._reply(handler, 200, page)

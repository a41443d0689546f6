"""Cross-site request defence for the JSON API (`/api/...`).

A browser attaches the session cookie to any request to this host, whichever page sends it,
and a "simple" cross-site request (a form post, or `fetch` with `Content-Type: text/plain`)
goes out without a CORS preflight. SameSite=Lax keeps the cookie off most of them, but not
off requests from sibling origins of the same site, and logging in needs no cookie at all
(login CSRF: a page logs the visitor into the attacker's account). So every state-changing
request (POST, PUT, PATCH, DELETE) to `/api/` that is authenticated by the cookie, and every
log-in, registration and log-out whatever its credentials:
- is refused with 403 when it carries an `Origin` other than this host's own or one of
  `CHATBOT_ALLOWED_ORIGINS` (browsers send `Origin` on every cross-origin request, and on
  same-origin POSTs too; clients that are not browsers send none, and authenticate with a
  bearer token, which no other page can attach);
- is refused with 415 when it has a body that is not `application/json`: a page of another
  site cannot send that content type without a preflight, which this API does not grant.
Requests with `Authorization: Bearer` are left alone: no other page can set that header.
The web pages (forms, outside `/api/`) carry their own CSRF token (web/csrf.py).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from litestar.datastructures import Headers
from litestar.types import ASGIApp, Receive, Scope, Send

from api.auth import COOKIE

UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# no session yet (or ending one): checked whatever credentials come with them
SESSION_PATHS = frozenset({"/api/auth/login", "/api/auth/register", "/api/auth/logout"})


def same_origin(origin: str, host: str, allowed: tuple[str, ...]) -> bool:
    """Whether a request's `Origin` is this host's own page or an allowed one."""
    return urlsplit(origin).netloc == host or origin in allowed


def _has_cookie_session(headers: Headers) -> bool:
    if headers.get("authorization", "").lower().startswith("bearer "):
        return False
    cookies = headers.get("cookie", "")
    return any(part.strip().startswith(f"{COOKIE}=") for part in cookies.split(";"))


def _has_body(headers: Headers) -> bool:
    return headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _refuse(send: Send, status: int, code: str, detail: str) -> None:
    body = json.dumps({"status_code": status, "code": code, "detail": detail}).encode()  # api/app.py's shape
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def cross_site_guard(allowed: tuple[str, ...]) -> Any:
    """The ASGI middleware factory Litestar takes (`middleware=[cross_site_guard(...)]`)."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def guard(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["method"] in UNSAFE and scope["path"].startswith("/api/"):
                headers = Headers.from_scope(scope)
                if scope["path"] in SESSION_PATHS or _has_cookie_session(headers):
                    origin = headers.get("origin")
                    if origin is not None and not same_origin(origin, headers.get("host", ""), allowed):
                        return await _refuse(send, 403, "foreign_origin",
                                             f"requests from {origin} may not act with this site's session")
                    if _has_body(headers) and not _is_json(headers.get("content-type", "")):
                        return await _refuse(send, 415, "unsupported_media_type",
                                             "send the body as JSON, with Content-Type: application/json")
            await app(scope, receive, send)

        return guard

    return middleware

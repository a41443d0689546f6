"""CSRF protection for the page forms: a signed double-submit token bound to the session.

A random `csrf` cookie (HttpOnly, SameSite=Strict) is set the first time a page renders a
form. Every form carries `_csrf` = HMAC(secret, cookie value + session cookie). A POST is
accepted only when the field matches the cookie it was derived from, so a page of another
site, which can neither read our cookies nor set them, cannot forge one; binding the
session means a token taken before logging in is worthless after. The JSON API is not
covered: it takes JSON bodies (a cross-site form cannot send one without a CORS preflight)
or a Bearer token."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie
from litestar.exceptions import PermissionDeniedException
from litestar.handlers import BaseRouteHandler

from api.auth import COOKIE as SESSION_COOKIE

CSRF_COOKIE = "csrf"
CSRF_FIELD = "_csrf"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


class CsrfFailed(PermissionDeniedException):
    """The form's token is missing or does not match this browser's cookie."""


def new_seed() -> str:
    return secrets.token_urlsafe(32)


def form_token(secret: bytes, seed: str, session: str) -> str:
    message = f"csrf|{seed}|{session}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def seed_cookie(seed: str, secure: bool) -> Cookie:
    return Cookie(key=CSRF_COOKIE, value=seed, httponly=True, samesite="strict", secure=secure, path="/")


def check_form_token(secret: bytes, cookies: dict[str, str], submitted: str | None) -> None:
    seed = cookies.get(CSRF_COOKIE)
    if not seed or not submitted:
        raise CsrfFailed("this form has expired: reload the page and try again")
    expected = form_token(secret, seed, cookies.get(SESSION_COOKIE, ""))
    if not hmac.compare_digest(expected, submitted):
        raise CsrfFailed("this form has expired: reload the page and try again")


Guard = Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], Awaitable[None]]


def csrf_guard(secret: bytes) -> Guard:
    """A route guard: every unsafe request to a page route carries a valid token. The form
    is parsed here and cached on the connection, so the handler reads it again for free."""

    async def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        if connection.scope["type"] != "http" or connection.scope["method"] in SAFE_METHODS:
            return
        form = await connection.form()  # type: ignore[attr-defined]
        check_form_token(secret, dict(connection.cookies), form.get(CSRF_FIELD))

    return guard

"""What every page controller uses: the session, rendering with the CSRF token and the
flash message, POST-redirect-GET, form fields with clear errors, the chat-list sidebar."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any
from uuid import UUID

from litestar import Request
from litestar.datastructures import Cookie, ResponseHeader
from litestar.response import Redirect, Template

from api.auth import COOKIE as SESSION_COOKIE
from api.auth import issue_token, user_of
from api.services import Services
from chatbot.runtime.config import Settings
from domain.user import InvalidCredentials
from web.chat_list import TZ_COOKIE, chat_list, with_groups
from web.csrf import CSRF_COOKIE, CSRF_FIELD, form_token, new_seed, seed_cookie

HERE = Path(__file__).parent.parent  # web/
TEMPLATES, STATIC = HERE / "templates", HERE / "static"
FLASH_COOKIE = "flash"
THEME_COOKIE = "theme"  # the account page's choice; none: follow the system (web/pages/theme.py)
THEMES = ("light", "dark")

# No inline script or style, no plugins, no framing, no foreign hosts: even markup that
# slipped past the sanitiser could not run a script or load anything.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    ResponseHeader(name="Content-Security-Policy", value=CSP),
    ResponseHeader(name="X-Content-Type-Options", value="nosniff"),
    ResponseHeader(name="Referrer-Policy", value="same-origin"),
    ResponseHeader(name="X-Frame-Options", value="DENY"),
]


class LoginRequired(Exception):
    """A page that needs a session was asked for without one: off to /login."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


# -- helpers -------------------------------------------------------------------------------


def safe_next(value: str | None, default: str = "/c") -> str:
    """Only a local path: `//host` or `/\\host` would leave the site, and so would either
    once a browser drops the tabs and line breaks it ignores in URLs (`/\t/host`): a value
    with a control character or a backslash anywhere is refused."""
    if not value or not value.startswith("/") or value.startswith("//"):
        return default
    if "\\" in value or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return default
    return value


def theme_of(request: Request[Any, Any, Any]) -> str | None:
    """The chosen theme, for `<html data-theme>`; None (the system's) for anything else."""
    theme = request.cookies.get(THEME_COOKIE)
    return theme if theme in THEMES else None


def viewer(request: Request[Any, Any, Any], services: Services) -> UUID | None:
    return user_of(request, services.settings.secret_key)


def require_viewer(request: Request[Any, Any, Any], services: Services) -> UUID:
    """The viewer; without a session, off to the log-in page (back here after it, for a
    GET). The pages' `user_id` dependency (web/pages/__init__.py); a page that takes query
    parameters calls it itself, once Litestar has validated them (api/current_user.py)."""
    user_id = viewer(request, services)
    if user_id is None:
        query = f"?{request.scope['query_string'].decode()}" if request.scope.get("query_string") else ""
        raise LoginRequired(request.url.path + query if request.method == "GET" else "/c")
    return user_id


def encode_flash(kind: str, text: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"kind": kind, "text": text[:500]}).encode()).decode()


def decode_flash(value: str | None) -> dict[str, str] | None:
    if not value:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(value.encode()))
        return {"kind": str(data["kind"]), "text": str(data["text"])}
    except (ValueError, KeyError, TypeError):
        return None


def flash_cookie(kind: str, text: str, secure: bool) -> Cookie:
    return Cookie(key=FLASH_COOKIE, value=encode_flash(kind, text), httponly=True, samesite="lax",
                  secure=secure, path="/", max_age=60)


def redirect(services: Services, path: str, flash: str | None = None, kind: str = "notice",
             cookies: list[Cookie] | None = None) -> Redirect:
    """303 See Other: the browser GETs the next page, so a reload never re-posts."""
    cookies = list(cookies or [])
    if flash:
        cookies.append(flash_cookie(kind, flash, services.settings.cookie_secure))
    return Redirect(path, status_code=303, cookies=cookies)


async def new_session_token(request: Request[Any, Any, Any], services: Services, user_id: UUID) -> str:
    """A log-in's token, for a session recorded so that it can be ended (api/sessions.py)."""
    session_id = await services.call(services.sessions.start, user_id, request.headers.get("user-agent", ""))
    return issue_token(services.settings.secret_key, user_id, services.settings.token_ttl_s, session_id)


def session_cookie(settings: Settings, token: str) -> Cookie:
    return Cookie(key=SESSION_COOKIE, value=token, httponly=True, samesite="lax", secure=settings.cookie_secure,
                  max_age=settings.token_ttl_s, path="/")


async def render(
    request: Request[Any, Any, Any], services: Services, template: str, status: int = 200, **context: Any
) -> Template:
    """A page: the template with the CSRF token, the flash message and the viewer."""
    settings = services.settings
    cookies: list[Cookie] = []
    seed = request.cookies.get(CSRF_COOKIE)
    if not seed:
        seed = new_seed()
        cookies.append(seed_cookie(seed, settings.cookie_secure))
    flash = decode_flash(request.cookies.get(FLASH_COOKIE))
    if request.cookies.get(FLASH_COOKIE) is not None:
        cookies.append(Cookie(key=FLASH_COOKIE, value="", max_age=0, path="/"))
    user_id = viewer(request, services)
    email = None
    if user_id is not None:
        try:
            email = await services.call(services.app.user_email, user_id)
        except InvalidCredentials:
            user_id = None
    context = {
        "csrf_field": CSRF_FIELD,
        "csrf_token": form_token(settings.secret_key, seed, request.cookies.get(SESSION_COOKIE, "")),
        "flash": flash, "viewer_id": user_id, "viewer_email": email, "path": request.url.path,
        "here": request.url.path + (f"?{request.url.query}" if request.url.query else ""),
        "theme": theme_of(request),
        **context,
    }
    with_groups(context, request.cookies.get(TZ_COOKIE))
    return Template(template_name=template, context=context, status_code=status, cookies=cookies)


def text_field(form: Any, name: str, max_length: int, required: bool = False, label: str | None = None) -> str:
    """A form field as stripped text, with a clear error when it is missing or too long
    (`label`: the field as the error names it, by default its name)."""
    label = label or name.replace("_", " ")
    value = form.get(name)
    value = value.strip() if isinstance(value, str) else ""
    if required and not value:
        raise FormError(f"{label} is required")
    if len(value) > max_length:
        raise FormError(f"{label} is {len(value):,} characters long; the limit is {max_length:,}. Shorten it")
    return value


def uuid_field(form: Any, name: str) -> UUID:
    try:
        return UUID(str(form.get(name, "")))
    except ValueError:
        raise FormError(f"{name.replace('_', ' ')} is not a valid id") from None


class FormError(ValueError):
    """A form field that cannot be used as sent; the message names it."""



async def sidebar(services: Services, user_id: UUID, q: str = "", archived: bool = False, **page: Any) -> dict[str, Any]:
    """The chat list's context (web/chat_list.py); `page`: its view, current chat and cursor."""
    return await chat_list(services, user_id, q, archived, **page)


async def over_limit(services: Services, user_id: UUID, conversation_id: UUID) -> Redirect | None:
    """Every form that requests a reply (send, edit, regenerate) counts against the user's
    rate, as its websocket frame does; over it, back to the chat with the reason."""
    limited = await services.call(services.limits.check_send, user_id)
    if limited is None:
        return None
    return redirect(services, f"/c/{conversation_id}", limited.message.capitalize(), kind="error")


"""Errors as pages: the reason in words, never a traceback."""

from __future__ import annotations

from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException
from litestar.response import Redirect

from domain.conversation import ConversationNotFound
from domain.persona import PersonaNotFound
from web.pages.common import (
    SECURITY_HEADERS,
    LoginRequired,
)


def error_page(request: Request[Any, Any, Any], status: int, title: str, message: str) -> Response[str]:
    engine = request.app.template_engine
    assert engine is not None, "the web pages need the template engine (web.pages.template_config)"
    html = engine.get_template("error.html").render(status=status, title=title, message=message)
    return Response(html, status_code=status, media_type=MediaType.HTML,
                    headers={h.name: str(h.value) for h in SECURITY_HEADERS})


def on_login_required(request: Request[Any, Any, Any], exc: LoginRequired) -> Response[Any]:
    from urllib.parse import quote

    return Redirect(f"/login?next={quote(exc.next_path, safe='/')}", status_code=303)


def on_not_authorized(request: Request[Any, Any, Any], _: Exception) -> Response[Any]:
    return Redirect("/login", status_code=303)


def on_csrf(request: Request[Any, Any, Any], exc: Exception) -> Response[str]:
    return error_page(request, 403, "Form expired", str(getattr(exc, "detail", exc)))


def on_not_found(request: Request[Any, Any, Any], _: Exception) -> Response[str]:
    return error_page(request, 404, "Not found", "There is nothing here, or it is not yours to see.")


def on_bad_form(request: Request[Any, Any, Any], exc: Exception) -> Response[str]:
    """A command the domain refused (or a form field it could not take): say why."""
    if isinstance(exc, (ConversationNotFound, PersonaNotFound)):
        return on_not_found(request, exc)
    message = str(exc) or type(exc).__name__
    return error_page(request, 400, "That did not work", message[:1].upper() + message[1:])


def on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[str]:
    if exc.status_code == 404:
        return on_not_found(request, exc)
    return error_page(request, exc.status_code, "Something went wrong", str(exc.detail))


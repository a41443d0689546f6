"""Errors as pages: the reason in words a person can act on, never a traceback.

A refusal's text comes from the domain (its exceptions say what was wrong, as sentences
without their capital and full stop); the few that carry only an id, and HTTP errors with
the framework's terse wording, get a sentence of their own here."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException
from litestar.response import Redirect

from domain.conversation_errors import (
    ConversationNotFound,
    MessageNotFound,
    ReplyAlreadyFinished,
    ReplyNotFound,
    ShareNotFound,
)
from domain.persona import PersonaNotFound, PersonaVersionNotFound
from web.pages.common import (
    SECURITY_HEADERS,
    LoginRequired,
    safe_next,
    theme_of,
)

# refusals whose text is an id, not a reason
BY_TYPE: dict[type[Exception], str] = {
    MessageNotFound: "That message is not in this chat any more. Reload the chat and try again.",
    ReplyNotFound: "That reply is not in this chat any more. Reload the chat and try again.",
    ReplyAlreadyFinished: "That reply has finished already.",
    ShareNotFound: "That link was not found: it may have been stopped already.",
}
# HTTP errors the framework raises with its own wording (a form too big, a wrong method…)
BY_STATUS = {
    400: ("That did not work", "The page sent something the server could not read. Go back, reload the page "
                               "and try again."),
    405: ("That did not work", "This address cannot be used that way. Go back to your chats and try again."),
    413: ("That is too big", "What you sent is larger than the server takes. Choose a smaller file, "
                             "or send less at once."),
    429: ("Too many requests", "Wait a minute, then try again."),
}


def sentence(text: str) -> str:
    """A domain message as a sentence: a capital first, a full stop last."""
    text = text.strip()
    if not text:
        return text
    text = text[:1].upper() + text[1:]
    return text if text[-1] in ".!?" else f"{text}."


def back_path(request: Request[Any, Any, Any]) -> str | None:
    """The page the form was on (same site only), to go back to it with what was typed."""
    referer = urlsplit(request.headers.get("referer", ""))
    if referer.netloc and referer.netloc != request.headers.get("host"):
        return None
    path = referer.path + (f"?{referer.query}" if referer.query else "")
    return safe_next(path, "") or None


def error_page(request: Request[Any, Any, Any], status: int, title: str, message: str) -> Response[str]:
    engine = request.app.template_engine
    assert engine is not None, "the web pages need the template engine (web.pages.template_config)"
    back = back_path(request) if request.method == "POST" else None
    html = engine.get_template("error.html").render(status=status, title=title, message=message,
                                                    back=back, theme=theme_of(request))
    return Response(html, status_code=status, media_type=MediaType.HTML,
                    headers={h.name: str(h.value) for h in SECURITY_HEADERS})


def on_login_required(request: Request[Any, Any, Any], exc: LoginRequired) -> Response[Any]:
    from urllib.parse import quote

    return Redirect(f"/login?next={quote(exc.next_path, safe='/')}", status_code=303)


def on_not_authorized(request: Request[Any, Any, Any], _: Exception) -> Response[Any]:
    return Redirect("/login", status_code=303)


def on_csrf(request: Request[Any, Any, Any], exc: Exception) -> Response[str]:
    return error_page(request, 403, "Form expired", sentence(str(getattr(exc, "detail", exc))))


def on_not_found(request: Request[Any, Any, Any], _: Exception) -> Response[str]:
    return error_page(request, 404, "Not found", "There is nothing here, or it is not yours to see.")


def on_bad_form(request: Request[Any, Any, Any], exc: Exception) -> Response[str]:
    """A command the domain refused (or a form field it could not take): say why."""
    if isinstance(exc, PersonaVersionNotFound):  # the persona is there: name the missing version
        return error_page(request, 404, "Not found", sentence(str(exc)))
    if isinstance(exc, (ConversationNotFound, PersonaNotFound)):
        return on_not_found(request, exc)
    message = BY_TYPE.get(type(exc)) or sentence(str(exc)) or "The server refused that. Go back and try again."
    return error_page(request, 400, "That did not work", message)


def on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[str]:
    if exc.status_code == 404:
        return on_not_found(request, exc)
    title, message = BY_STATUS.get(exc.status_code, (
        "Something went wrong", "The server could not do that. Go back and try again in a moment."))
    return error_page(request, exc.status_code, title, message)

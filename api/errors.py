"""The one place where domain errors become HTTP status codes, and the error body of the
JSON API (the `/v1` routes map the same errors to OpenAI's body: api/openai_schemas.py)."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException

from api.throttle import TooManyAttempts
from chatbot.eventstore.group_commit import EventTooLarge
from chatbot.runtime.postgres import WriteTimeout
from domain.app_accounts import PasswordCheckBusy
from domain.conversation_errors import (
    ConversationError,
    ConversationNotFound,
    MessageNotFound,
    PersonaUnavailable,
    ReplyNotFound,
    ReplyStillPending,
    ShareNotFound,
)
from domain.persona import InvalidPersona, NotPersonaOwner, PersonaNotFound, SlugTaken
from domain.user import (
    ApiKeyNotFound,
    EmailAlreadyRegistered,
    InvalidCredentials,
    UserError,
)

log = logging.getLogger("api")

# domain error -> (HTTP status, error code); the most specific class wins.
ERROR_STATUS: list[tuple[type[Exception], int, str]] = [
    (EmailAlreadyRegistered, 409, "email_taken"),
    (InvalidCredentials, 401, "invalid_credentials"),
    (ApiKeyNotFound, 404, "api_key_not_found"),
    (UserError, 400, "invalid_user"),
    (ConversationNotFound, 404, "not_found"),
    (ShareNotFound, 404, "share_not_found"),
    (MessageNotFound, 404, "message_not_found"),
    (ReplyNotFound, 404, "not_found"),
    (PersonaNotFound, 404, "persona_not_found"),
    (NotPersonaOwner, 403, "not_owner"),
    (SlugTaken, 409, "slug_taken"),
    (InvalidPersona, 400, "invalid_persona"),
    (ReplyStillPending, 409, "reply_pending"),
    (PersonaUnavailable, 409, "persona_unavailable"),
    (ConversationError, 400, "rejected"),
    (WriteTimeout, 503, "busy"),  # nothing was saved: the client may try again
    (PasswordCheckBusy, 503, "busy"),
    (TooManyAttempts, 429, "rate_limited"),
    (EventTooLarge, 413, "too_large"),
    # malformed bodies that reach a decoder: msgspec answers very deep nesting with a
    # RecursionError, and a body may not be UTF-8 at all
    (RecursionError, 400, "invalid_json"),
    (UnicodeDecodeError, 400, "invalid_json"),
]
# what the client is told for errors whose own text means nothing to it
FIXED_DETAIL: dict[type[Exception], str] = {
    RecursionError: "the JSON nests too deeply",
    UnicodeDecodeError: "the body is not valid UTF-8 text",
}

def detail_of(exc: Exception) -> str:
    return next((text for cls, text in FIXED_DETAIL.items() if isinstance(exc, cls)), str(exc))

def error_body(status: int, code: str, detail: str, **extra: Any) -> dict[str, Any]:
    """Every error of the JSON API has this shape (the `/v1` routes answer OpenAI's instead):
    `status_code` and `detail` as Litestar documents its errors in the OpenAPI schema, and
    `code`, a stable word a client can branch on."""
    return {"status_code": status, "code": code, "detail": detail, **extra}


# Litestar's own errors (no session, unknown route, a body that fails validation...) -> code
HTTP_CODES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 409: "conflict", 413: "too_large", 415: "unsupported_media_type",
              429: "rate_limited", 503: "busy"}


def domain_error(_: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    for cls, status, code in ERROR_STATUS:
        if isinstance(exc, cls):
            headers = {"Retry-After": str(getattr(exc, "retry_after", 5))} if status in (429, 503) else None
            return Response(error_body(status, code, detail_of(exc)), status_code=status, headers=headers)
    return Response(error_body(500, "error", "internal error"), status_code=500)


def unexpected_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    """A bug: the client gets the usual 500 body, the log the traceback (Litestar logs
    nothing of it outside debug mode)."""
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return Response(error_body(500, "error", "internal error"), status_code=500)


def http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    status = exc.status_code
    if status >= 500:
        log.error("request failed: %s", exc.detail)
        return Response(error_body(status, "error", "internal error"), status_code=status)
    extra = {"extra": exc.extra} if exc.extra else {}
    return Response(error_body(status, HTTP_CODES.get(status, "error"), exc.detail, **extra),
                    status_code=status, headers=exc.headers)

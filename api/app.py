"""The Litestar application: routes, the composition root's lifespan, and the one place
where domain errors become HTTP status codes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request, Response
from litestar.di import Provide
from litestar.exceptions import HTTPException

from api.account import AccountController
from api.chat_socket import chat_socket
from api.csrf import cross_site_guard
from api.headers import docs_headers
from api.openapi_errors import document_errors
from api.throttle import TooManyAttempts
from api.openai_compat import ApiKeyController, OpenAIController
from api.routes import (
    AuthController,
    ConversationController,
    HealthController,
    PersonaController,
    ShareController,
    TransferController,
)
from api.services import Services
from api.training import ConsentController
from chatbot.config import load_settings
from chatbot.eventstore import EventTooLarge
from chatbot.metrics import serve as serve_metrics
from chatbot.postgres import WriteTimeout
from chatbot.tracing import setup_tracing
from chatbot.tracing import shutdown as shutdown_tracing
from domain.application import PasswordCheckBusy
from domain.conversation import ConversationError, ConversationNotFound, MessageNotFound, ShareNotFound, ReplyNotFound, ReplyStillPending, PersonaUnavailable
from domain.persona import InvalidPersona, NotPersonaOwner, PersonaError, PersonaNotFound, SlugTaken
from domain.user import ApiKeyNotFound, EmailAlreadyRegistered, InvalidCredentials, UserError
from web.pages import page_handlers, template_config
from workers.runtime import setup_logging

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

def create_app() -> Litestar:
    settings = load_settings()
    services: dict[str, Services] = {}

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        setup_logging("api", settings.log_format)
        setup_tracing("api")  # spans of the chat websocket's frames (chatbot/tracing.py)
        services["services"] = await Services.create(settings)
        serve_metrics(settings.metrics_port, settings.metrics_host)  # a port of its own: chatbot/metrics.py
        try:
            yield
        finally:
            await services["services"].close()
            shutdown_tracing()

    def provide_services() -> Services:
        return services["services"]

    def document(app: Litestar) -> None:
        document_errors(app.openapi_schema)  # api/openapi_errors.py

    return Litestar(
        on_startup=[document],
        route_handlers=[
            chat_socket, AuthController, PersonaController, ConversationController,
            HealthController, ApiKeyController, OpenAIController, ShareController, TransferController, ConsentController,
            AccountController,  # GET /api/me (MeController's) and DELETE /api/me
            *page_handlers(settings),  # the web UI: server-rendered pages and their static files
        ],
        template_config=template_config,
        dependencies={"services": Provide(provide_services, sync_to_thread=False)},
        middleware=[cross_site_guard(settings.allowed_origins), docs_headers()],  # api/csrf.py, api/headers.py
        exception_handlers={
            UserError: domain_error, ConversationError: domain_error, PersonaError: domain_error,
            WriteTimeout: domain_error, EventTooLarge: domain_error, PasswordCheckBusy: domain_error,
            TooManyAttempts: domain_error,
            RecursionError: domain_error, UnicodeDecodeError: domain_error,
            HTTPException: http_error, Exception: unexpected_error,
        },
        lifespan=[lifespan],
    )

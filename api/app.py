"""The Litestar application of the API: routes, error handlers (api/errors.py) and the
lifespan that builds the services. The process serves it with the web UI's pages
(chatbot/ops/server.py)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.contrib.jinja import JinjaTemplateEngine
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.template import TemplateConfig
from litestar.types import ControllerRouterHandler

from api.account import AccountController
from api.api_keys import ApiKeyController
from api.chat_socket import chat_socket
from api.conversations import ConversationController
from api.csrf import cross_site_guard
from api.current_user import current_user
from api.errors import domain_error, http_error, unexpected_error
from api.headers import docs_headers
from api.health import HealthController
from api.login import AuthController
from api.openai_compat import OpenAIController
from api.openapi_errors import document_errors
from api.personas import PersonaController
from api.services import Services
from api.shares import ShareController
from api.throttle import TooManyAttempts
from api.training import ConsentController
from api.transfer import TransferController
from chatbot.eventstore.group_commit import EventTooLarge
from chatbot.runtime.config import Settings, load_settings
from chatbot.runtime.metrics import serve as serve_metrics
from chatbot.runtime.postgres import WriteTimeout
from chatbot.runtime.process import setup_logging
from chatbot.runtime.tracing import setup_tracing
from chatbot.runtime.tracing import shutdown as shutdown_tracing
from domain.app_accounts import PasswordCheckBusy
from domain.conversation_errors import ConversationError
from domain.persona import PersonaError
from domain.user import UserError

log = logging.getLogger("api")


def create_app(
    settings: Settings | None = None, pages: Sequence[ControllerRouterHandler] = (),
    template_config: TemplateConfig[JinjaTemplateEngine] | None = None,
) -> Litestar:
    """The API, with `pages` (and their templates) served beside it."""
    settings = settings or load_settings()
    services: dict[str, Services] = {}

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        setup_logging("api", settings.log_format)
        setup_tracing("api")  # spans of the chat websocket's frames (chatbot/runtime/tracing.py)
        services["services"] = await Services.create(settings)
        serve_metrics(settings.metrics_port, settings.metrics_host)  # a port of its own: chatbot/runtime/metrics.py
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
            *pages,  # the web UI (chatbot/ops/server.py): server-rendered pages and their static files
        ],
        template_config=template_config,
        dependencies={
            "services": Provide(provide_services, sync_to_thread=False),
            "user_id": Provide(current_user, sync_to_thread=False),  # the session's user: api/current_user.py
        },
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

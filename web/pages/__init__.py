"""Page controllers: the server-rendered web UI, one controller per resource.

Pages read through the services the API uses and render Jinja templates; every form posts
to a page route, which runs the command, waits for the read models to catch up and
redirects (POST-redirect-GET) with a one-shot flash message. Forms carry a CSRF token
(`web.csrf`); the session is the API's cookie (`api.auth`), and a handler's `user_id`
parameter is the viewer (`require_viewer`: without a session, off to the log-in page). The
one script, `static/chat.js`, streams replies over the websocket and enhances the chat
forms; without it every form still works, replies simply appear on reload.

Routes: /login, /register, /logout; /c (conversations and a new one), /c/{id} (the chat)
and its actions (/c/{id}/messages, .../edit, .../regenerate, .../feedback, /branch, /rename,
/archive, /delete, /shares), /c/import; /personas, /personas/new, /personas/{id}/edit
(and .../versions/{n}/restore);
/account and its forms (/account/keys: API keys);
/s/{share_id} (a shared snapshot, public); /shares (the user's links, to copy or stop);
/theme (the colour theme: a cookie, web/pages/theme.py)."""

from __future__ import annotations

from typing import Any

from litestar import Router
from litestar.datastructures import CacheControlHeader
from litestar.di import Provide
from litestar.exceptions import HTTPException, NotAuthorizedException, NotFoundException
from litestar.static_files import create_static_files_router

from chatbot.runtime.config import Settings
from domain.conversation_errors import ConversationError
from domain.persona import PersonaError
from domain.user import UserError
from web.csrf import CsrfFailed, csrf_guard
from web.pages.account import AccountPages
from web.pages.api_keys import ApiKeyPages
from web.pages.auth import AuthPages
from web.pages.common import (
    SECURITY_HEADERS,
    STATIC,
    FormError,
    LoginRequired,
    require_viewer,
)
from web.pages.conversations import ConversationPages
from web.pages.errors import (
    on_bad_form,
    on_csrf,
    on_http_error,
    on_login_required,
    on_not_authorized,
    on_not_found,
)
from web.pages.personas import PersonaPages
from web.pages.shares import SharePages
from web.pages.templating import template_config
from web.pages.theme import ThemePages

__all__ = ["page_handlers", "template_config"]


def page_handlers(settings: Settings) -> list[Any]:
    """The page routes (CSRF-guarded, security headers, HTML errors) and the static files."""
    pages = Router(
        path="/",
        route_handlers=[AuthPages, ConversationPages, PersonaPages, AccountPages, ApiKeyPages, SharePages, ThemePages],
        guards=[csrf_guard(settings.secret_key)],
        # `user_id`: the viewer; without a session, off to the log-in page (LoginRequired)
        dependencies={"user_id": Provide(require_viewer, sync_to_thread=False)},
        response_headers=SECURITY_HEADERS,
        include_in_schema=False,
        exception_handlers={
            LoginRequired: on_login_required,
            NotAuthorizedException: on_not_authorized,
            CsrfFailed: on_csrf,
            NotFoundException: on_not_found,
            FormError: on_bad_form,
            UserError: on_bad_form,
            ConversationError: on_bad_form,
            PersonaError: on_bad_form,
            HTTPException: on_http_error,
        },
    )
    # the pages link static files with a digest of their content (`?v=`): cache for long
    static = create_static_files_router(path="/static", directories=[STATIC], include_in_schema=False,
                                        cache_control=CacheControlHeader(max_age=86400, public=True))
    return [pages, static]

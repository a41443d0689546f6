"""The user a request acts for, as a dependency: api/app.py provides `current_user` under
the name `user_id`, so a handler that takes a `user_id` parameter gets the user of the
request's session, and a request without a valid token or session cookie is answered 401
with the body `api.auth.require_user` gives it. Layers below name another user `user_id`:
the `/v1` routes the owner of the request's API key (api/openai_compat.py), the web pages
the viewer, whose absence sends them to the log-in page (web/pages/__init__.py).

Every handler of a signed-in user takes it this way, those with a body or query parameters
too: a request without a session is answered 401 before its body and query are validated
(a body that cannot be parsed at all may still be refused first, 400).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from litestar import Request

from api.auth import require_user
from api.services import Services


def current_user(request: Request[Any, Any, Any], services: Services) -> UUID:
    """The session's user; 401 without one."""
    return require_user(request, services.settings.secret_key)

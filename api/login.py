"""`/api/auth`: registration, log-in and log-out. Log-ins and registrations are
throttled per client address, log-ins per account too (api/throttle.py)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from litestar import Controller, Request, Response, post
from litestar.datastructures import Cookie
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_204_NO_CONTENT

from api import schemas
from api.auth import COOKIE, issue_token, session_of
from api.services import Services
from api.throttle import client_address, refuse_if
from domain.user import InvalidCredentials


def checked_log_in(services: Services, address: str, email: str, password: str) -> UUID:
    """A log-in, throttled per client address and per account (api/throttle.py)."""
    refuse_if(services.throttle.attempt(address))
    refuse_if(services.throttle.account_locked(email))
    try:
        return services.app.authenticate(email, password)
    except InvalidCredentials:
        services.throttle.failed(email)
        raise


class AuthController(Controller):
    path = "/api/auth"

    @post("/register", status_code=HTTP_201_CREATED)
    async def register_user(self, request: Request[Any, Any, Any], data: schemas.Credentials,
                            services: Services) -> schemas.Registered:
        refuse_if(await services.call(services.throttle.attempt, client_address(request, services.settings)))
        user_id = await services.call(services.app.register_user, data.email, data.password)
        return schemas.Registered(user_id=user_id)

    @post("/login", status_code=HTTP_200_OK)
    async def log_in(self, request: Request[Any, Any, Any], data: schemas.Credentials,
                     services: Services) -> Response[schemas.LoggedIn]:
        user_id = await services.call(checked_log_in, services, client_address(request, services.settings),
                                      data.email, data.password)
        s = services.settings
        session_id = await services.call(services.sessions.start, user_id, request.headers.get("user-agent", ""))
        token = issue_token(s.secret_key, user_id, s.token_ttl_s, session_id)
        cookie = Cookie(key=COOKIE, value=token, httponly=True, samesite="lax", secure=s.cookie_secure,
                        max_age=s.token_ttl_s, path="/")
        return Response(schemas.LoggedIn(token=token, user_id=user_id), cookies=[cookie])

    @post("/logout", status_code=HTTP_204_NO_CONTENT)
    async def log_out(self, request: Request[Any, Any, Any], services: Services) -> Response[None]:
        """Ends the session the request was made with: its token stops working everywhere."""
        session = session_of(request, services.settings.secret_key)
        if session is not None:
            await services.call(services.sessions.end, session.user_id, session.session_id)
        return Response(None, status_code=HTTP_204_NO_CONTENT, cookies=[Cookie(key=COOKIE, value="", max_age=0, path="/")])

"""Log-in, registration and log-out pages."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.datastructures import Cookie
from litestar.response import Redirect, Template

from api.auth import COOKIE as SESSION_COOKIE
from api.auth import session_of
from api.login import checked_log_in
from api.services import Services
from api.throttle import TooManyAttempts, client_address, refuse_if
from domain.user import InvalidCredentials, UserError
from web.pages.common import (
    FormError,
    new_session_token,
    redirect,
    render,
    safe_next,
    session_cookie,
    text_field,
    viewer,
)


class AuthPages(Controller):
    path = "/"
    include_in_schema = False

    @get("/")
    async def show_home(self, request: Request[Any, Any, Any], services: Services) -> Redirect:
        return Redirect("/c" if viewer(request, services) else "/login", status_code=303)

    @get("/login")
    async def show_login(self, request: Request[Any, Any, Any], services: Services, next: str = "/c") -> Template:
        return await render(request, services, "login.html", mode="login", next=safe_next(next))

    @post("/login")
    async def log_in(self, request: Request[Any, Any, Any], services: Services) -> Response[Any]:
        form = await request.form()
        email, password = text_field(form, "email", 254), str(form.get("password", ""))
        next_path = safe_next(form.get("next"))
        try:
            user_id = await services.call(checked_log_in, services, client_address(request, services.settings),
                                          email, password)
        except InvalidCredentials:
            return await render(request, services, "login.html", status=401, mode="login", next=next_path,
                                email=email, error="Wrong e-mail address or password.")
        except TooManyAttempts as e:
            return await render(request, services, "login.html", status=429, mode="login", next=next_path,
                                email=email, error=f"{str(e).capitalize()}.")
        token = await new_session_token(request, services, user_id)
        return redirect(services, next_path, cookies=[session_cookie(services.settings, token)])

    @get("/register")
    async def show_register(self, request: Request[Any, Any, Any], services: Services) -> Template:
        return await render(request, services, "login.html", mode="register", next="/c")

    @post("/register")
    async def register(self, request: Request[Any, Any, Any], services: Services) -> Response[Any]:
        form = await request.form()
        email, password = text_field(form, "email", 254), str(form.get("password", ""))
        try:
            if password != form.get("password_again", password):
                raise FormError("the two passwords differ")
            refuse_if(await services.call(services.throttle.attempt, client_address(request, services.settings)))
            user_id = await services.call(services.app.register_user, email, password)
        except TooManyAttempts as e:
            return await render(request, services, "login.html", status=429, mode="register", next="/c",
                                email=email, error=f"{str(e).capitalize()}.")
        except (UserError, FormError) as e:
            status = 409 if "already registered" in str(e) else 400
            return await render(request, services, "login.html", status=status, mode="register", next="/c",
                                email=email, error=str(e).capitalize())
        token = await new_session_token(request, services, user_id)
        return redirect(services, "/c", "Welcome! Pick a persona and start a chat.",
                        cookies=[session_cookie(services.settings, token)])

    @post("/logout")
    async def log_out(self, request: Request[Any, Any, Any], services: Services) -> Redirect:
        session = session_of(request, services.settings.secret_key)
        if session is not None:  # the cookie stops working everywhere, not just here
            await services.call(services.sessions.end, session.user_id, session.session_id)
        gone = Cookie(key=SESSION_COOKIE, value="", max_age=0, path="/")
        return redirect(services, "/login", "You are logged out.", cookies=[gone])


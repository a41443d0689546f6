"""The account page: consent to training use, sessions, API keys (web/pages/api_keys.py),
erasing the account."""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

from litestar import Controller, Request, Response, get, post
from litestar.datastructures import Cookie
from litestar.response import Redirect, Template

from api.api_keys import key_infos
from api.auth import COOKIE as SESSION_COOKIE
from api.auth import session_of
from api.services import Services
from domain.user import InvalidCredentials
from web.pages.common import (
    redirect,
    render,
    sidebar,
)


class AccountPages(Controller):
    """The account: consent to training use, and erasing the account with all its data."""

    path = "/account"
    include_in_schema = False

    @get("/")
    async def show_account(self, request: Request[Any, Any, Any], services: Services, user_id: UUID) -> Template:
        return await account_page(request, services, user_id)

    @post("/sessions/{session_id:uuid}/end")
    async def end_session(self, services: Services, user_id: UUID, session_id: UUID) -> Redirect:
        """End one of the viewer's sessions (say, a lost phone's): its cookie or token stops working."""
        ended = await services.call(services.sessions.end, user_id, session_id)
        return redirect(services, "/account", "That session is ended." if ended else "That session had ended already.")

    @post("/consent")
    async def set_consent(self, request: Request[Any, Any, Any], services: Services, user_id: UUID) -> Redirect:
        form = await request.form()
        training = form.get("training") == "on"
        await services.call(services.app.set_training_consent, user_id, training)
        note = "Your conversations may now help train the model." if training else \
            "Your conversations will not be used for training."
        return redirect(services, "/account", note)

    @post("/delete")
    async def delete_account(self, request: Request[Any, Any, Any], services: Services, user_id: UUID) -> Response[Any]:
        """Erase the account: its data key is destroyed, so every message it wrote becomes
        unreadable everywhere; the read models drop its rows."""
        form = await request.form()
        if form.get("confirm") != "erase":
            return redirect(services, "/account", "Tick the box to confirm that everything should be erased.", "error")
        try:
            await services.call(services.app.delete_account, user_id, str(form.get("password", "")))
        except InvalidCredentials:
            return redirect(services, "/account", "Wrong password: nothing was erased.", "error")
        await services.call(services.sessions.forget, user_id)
        await services.call(services.key_use.forget, user_id)
        gone = Cookie(key=SESSION_COOKIE, value="", max_age=0, path="/")
        return redirect(services, "/login", "Your account and all its conversations are erased.", cookies=[gone])


async def account_page(request: Request[Any, Any, Any], services: Services, user_id: UUID, **extra: Any) -> Template:
    """The account page; `extra` adds to what it shows (a key just made, shown once)."""
    consent = await services.call(services.app.training_consent, user_id)
    current = session_of(request, services.settings.secret_key)
    sessions = await services.call(services.sessions.live, user_id)
    for s in sessions:
        s["current"] = current is not None and s["id"] == current.session_id
    return await render(request, services, "account.html", training_consent=consent, sessions=sessions,
                        api_keys=await key_infos(services, user_id), key_client_id=uuid4().hex,
                        **extra, **await sidebar(services, user_id))

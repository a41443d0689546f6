"""API keys on the account page: make one (shown once), change its setting, revoke it.

The full key exists only in the response to the form that made it: that response *is* the
account page, rendered with the key and `Cache-Control: no-store`, rather than a redirect.
The alternative, a redirect with the key in a short-lived cookie, would write the secret to
the browser's cookie store (and need encrypting); a URL or the flash cookie would leak it to
history and logs. The price is that a reload re-posts the form: the form's client id makes
that harmless (`ApiKeyAlreadyMade`: no second key, and a note that the key was shown once).
Every other form here redirects (POST-redirect-GET) as usual.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from litestar import Controller, Request, Response, get, post
from litestar.response import Redirect

from api.services import Services
from domain.user import (
    MAX_API_KEY_NAME,
    MAX_CLIENT_ID,
    ApiKeyAlreadyMade,
    ApiKeyNotFound,
    UserError,
    parse_api_key,
)
from web.pages.account import account_page
from web.pages.common import FormError, redirect, text_field

KEYS = "/account#api-keys"


def list_apart_field(form: Any) -> bool:
    """The checkbox: sent as "on" when ticked, absent when not."""
    value = form.get("list_apart")
    if value not in (None, "on"):
        raise FormError("list apart is a checkbox: on or absent")
    return value == "on"


class ApiKeyPages(Controller):
    """The account page's API keys section (api/api_keys.py serves the keys' API)."""

    path = "/account/keys"
    include_in_schema = False

    @get("/")
    async def keys_after_reload(self) -> Redirect:
        """The address bar shows this after a key is made: a visit goes to the account page."""
        return Redirect(KEYS, status_code=303)

    @post("/")
    async def create_key(self, request: Request[Any, Any, Any], services: Services, user_id: UUID) -> Response[Any]:
        """Make a key; the answer is the account page showing it, this once (see above)."""
        form = await request.form()
        try:
            name = text_field(form, "name", MAX_API_KEY_NAME, required=True)
            client_id = text_field(form, "client_id", MAX_CLIENT_ID, required=True)
            list_apart = list_apart_field(form)
            key = await services.call(services.app.create_api_key, user_id, name, list_apart, client_id)
        except ApiKeyAlreadyMade as made:
            return redirect(services, KEYS, f"The key {made.key_id} was made already and shown once. If you did not"
                            " copy it, revoke it and make another.", "error")
        except (FormError, UserError) as e:
            return redirect(services, KEYS, f"No key was made: {e}.", "error")
        page = await account_page(request, services, user_id,
                                  new_key={"key": key, "key_id": parse_api_key(key)[0], "name": name})
        page.set_header("Cache-Control", "no-store")  # the key must not be kept anywhere
        return page

    @post("/{key_id:str}/listing")
    async def set_listing(
        self, request: Request[Any, Any, Any], services: Services, user_id: UUID, key_id: str
    ) -> Redirect:
        """List apart the chats the key starts from now on, or not."""
        list_apart = list_apart_field(await request.form())
        try:
            await services.call(services.app.set_api_key_listing, user_id, key_id, list_apart)
        except ApiKeyNotFound:
            return redirect(services, KEYS, "You have no such key, or it is revoked: nothing changed.", "error")
        return redirect(services, KEYS, "Chats this key starts will be listed apart." if list_apart
                        else "Chats this key starts will be in your chat list.")

    @post("/{key_id:str}/revoke")
    async def revoke_key(self, services: Services, user_id: UUID, key_id: str) -> Redirect:
        """Revoke the key: requests with it are refused from now on."""
        try:
            await services.call(services.app.revoke_api_key, user_id, key_id)
        except ApiKeyNotFound:
            return redirect(services, KEYS, "You have no such key: nothing was revoked.", "error")
        return redirect(services, KEYS, f"The key {key_id} is revoked: it opens nothing any more.")

"""The account itself: `GET /api/me` (as `MeController`) and `DELETE /api/me`, which
erases the logged-in user's account.

Erasure is crypto-shredding (chatbot/eventstore.py): `User.Erased` is recorded and the
user's data key destroyed in one transaction, so their conversations, messages and account
can no longer be read by anyone, and the projector then drops their read-model rows. It
cannot be undone, so the request must carry the account's password.

`AccountController` extends `MeController` rather than standing beside it: Litestar
cannot mount two controllers on one path (both would bring an OPTIONS handler), so the
app registers this one in its place.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, delete
from litestar.datastructures import Cookie
from litestar.status_codes import HTTP_204_NO_CONTENT

from api.auth import COOKIE, require_user
from api.routes import MeController
from api.services import Services
from domain.user import MAX_PASSWORD


class AccountDeletion(msgspec.Struct, forbid_unknown_fields=True):
    password: str = msgspec.field()

    def __post_init__(self) -> None:
        if not 1 <= len(self.password) <= MAX_PASSWORD:
            raise ValueError(f"the password has 1 to {MAX_PASSWORD} characters")


class AccountController(MeController):
    path = "/api/me"

    @delete("/", status_code=HTTP_204_NO_CONTENT)
    async def delete_account(
        self, request: Request[Any, Any, Any], services: Services, data: AccountDeletion
    ) -> Response[None]:
        """Erase the caller's account for good (204); 401 if the password is wrong."""
        user_id = require_user(request, services.settings.secret_key)
        await services.call(services.app.delete_account, user_id, data.password)
        return Response(None, status_code=HTTP_204_NO_CONTENT,
                        cookies=[Cookie(key=COOKIE, value="", max_age=0, path="/")])

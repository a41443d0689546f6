"""The account itself: `GET /api/me` (as `MeController`), `DELETE /api/me`, which erases
the logged-in user's account, and the sessions it is logged in with (`GET /api/me/sessions`,
`DELETE /api/me/sessions/{id}`: api/sessions.py).

Erasure is crypto-shredding (chatbot/eventstore/keys.py): `User.Erased` is recorded and the
user's data key destroyed in one transaction, so their conversations, messages and account
can no longer be read by anyone, and the projector then drops their read-model rows. It
cannot be undone, so the request must carry the account's password.

`AccountController` extends `MeController` rather than standing beside it: Litestar
cannot mount two controllers on one path (both would bring an OPTIONS handler), so the
app registers this one in its place.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
from litestar import Controller, Request, Response, delete, get
from litestar.datastructures import Cookie
from litestar.exceptions import NotFoundException
from litestar.status_codes import HTTP_204_NO_CONTENT

from api import schemas
from api.auth import COOKIE, require_session
from api.services import Services
from domain.user import MAX_PASSWORD


class AccountDeletion(msgspec.Struct, forbid_unknown_fields=True):
    password: str = msgspec.field()

    def __post_init__(self) -> None:
        if not 1 <= len(self.password) <= MAX_PASSWORD:
            raise ValueError(f"the password has 1 to {MAX_PASSWORD} characters")


class SessionInfo(msgspec.Struct):
    id: UUID
    created_at: datetime
    user_agent: str
    current: bool


class MeController(Controller):
    path = "/api/me"

    @get("/")
    async def get_me(self, services: Services, user_id: UUID) -> schemas.Me:
        email = await services.call(services.app.user_email, user_id)
        consent = await services.call(services.app.training_consent, user_id)
        return schemas.Me(user_id=user_id, email=email, training_consent=consent)


class AccountController(MeController):
    path = "/api/me"

    @delete("/", status_code=HTTP_204_NO_CONTENT)
    async def delete_account(
        self, services: Services, user_id: UUID, data: AccountDeletion
    ) -> Response[None]:
        """Erase the caller's account for good (204); 401 if the password is wrong."""
        await services.call(services.app.delete_account, user_id, data.password)
        await services.call(services.sessions.forget, user_id)  # every token of theirs stops working
        await services.call(services.key_use.forget, user_id)
        return Response(None, status_code=HTTP_204_NO_CONTENT,
                        cookies=[Cookie(key=COOKIE, value="", max_age=0, path="/")])

    @get("/sessions")
    async def list_sessions(self, request: Request[Any, Any, Any], services: Services) -> list[SessionInfo]:
        """Where the caller is logged in: each session not ended, newest first, the
        request's own marked `current`."""
        session = require_session(request, services.settings.secret_key)
        rows = await services.call(services.sessions.live, session.user_id)
        return [SessionInfo(id=r["id"], created_at=r["created_at"], user_agent=r["user_agent"],
                            current=r["id"] == session.session_id) for r in rows]

    @delete("/sessions/{session_id:uuid}", status_code=HTTP_204_NO_CONTENT)
    async def end_session(self, request: Request[Any, Any, Any], services: Services, session_id: UUID) -> None:
        """End one of the caller's sessions (another device's, or this one): 404 if none."""
        session = require_session(request, services.settings.secret_key)
        if not await services.call(services.sessions.end, session.user_id, session_id):
            raise NotFoundException("no such session of yours (it may have ended already)")

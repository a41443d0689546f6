"""`/api/keys` (session-authenticated, like the rest of `/api`): the API keys that open the
OpenAI-compatible API (api/openai_compat.py), to create, list, change and revoke. A key is
shown once, when made; only its hash is stored. A listed key shows when it was made and
last used (api/key_use.py) and its setting `list_apart`: the chats it starts are then
marked to be kept out of the chat list.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated
from uuid import UUID

import msgspec
from litestar import Controller, delete, get, patch, post
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from api.services import Services
from domain.user import parse_api_key

KeyName = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]


class ApiKeyCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: KeyName = "default"
    list_apart: bool = True  # the chats this key starts are kept out of the chat list


class ApiKeyUpdate(msgspec.Struct, forbid_unknown_fields=True):
    list_apart: bool


class ApiKeyCreated(msgspec.Struct):
    key: str  # shown this once; only its hash is stored
    key_id: str
    name: str
    list_apart: bool


class ApiKeyInfo(msgspec.Struct):
    key_id: str
    name: str
    revoked: bool
    list_apart: bool
    created_at: datetime | None  # None: made before the time was recorded
    last_used_at: datetime | None  # None: never used (to within a minute: api/key_use.py)


async def key_infos(services: Services, user_id: UUID) -> list[ApiKeyInfo]:
    """The user's keys as listed, with their last use."""
    keys = await services.call(services.app.api_keys, user_id)
    used = await services.call(services.key_use.last_used, user_id)
    return [ApiKeyInfo(key_id=k["key_id"], name=k["name"], revoked=k["revoked"], list_apart=k["list_apart"],
                       created_at=k["created_at"], last_used_at=used.get(k["key_id"])) for k in keys]


class ApiKeyController(Controller):
    path = "/api/keys"

    @post("/", status_code=HTTP_201_CREATED)
    async def create_api_key(
        self, services: Services, user_id: UUID, data: ApiKeyCreate
    ) -> ApiKeyCreated:
        key = await services.call(services.app.create_api_key, user_id, data.name, data.list_apart)
        return ApiKeyCreated(key=key, key_id=parse_api_key(key)[0], name=data.name.strip(), list_apart=data.list_apart)

    @get("/")
    async def list_api_keys(self, services: Services, user_id: UUID) -> list[ApiKeyInfo]:
        """The caller's keys, revoked ones too, oldest first."""
        return await key_infos(services, user_id)

    @patch("/{key_id:str}")
    async def update_api_key(
        self, services: Services, user_id: UUID, key_id: str, data: ApiKeyUpdate
    ) -> ApiKeyInfo:
        """Change whether the chats the key starts from now on are listed apart; 404 if the
        key is not the caller's or is revoked."""
        await services.call(services.app.set_api_key_listing, user_id, key_id, data.list_apart)
        return next(k for k in await key_infos(services, user_id) if k.key_id == key_id)

    @delete("/{key_id:str}", status_code=HTTP_204_NO_CONTENT)
    async def revoke_api_key(self, services: Services, user_id: UUID, key_id: str) -> None:
        await services.call(services.app.revoke_api_key, user_id, key_id)

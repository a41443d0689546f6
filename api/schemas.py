"""msgspec structs: the API's request and response bodies and the websocket frames."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated
from uuid import UUID

import msgspec

Email = Annotated[str, msgspec.Meta(min_length=3, max_length=254)]
Password = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
ClientId = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]


class Credentials(msgspec.Struct, forbid_unknown_fields=True):
    email: Email
    password: Password


class Registered(msgspec.Struct):
    user_id: UUID


class LoggedIn(msgspec.Struct):
    token: str
    user_id: UUID


class Me(msgspec.Struct):
    user_id: UUID
    email: str


class ConversationCreate(msgspec.Struct, forbid_unknown_fields=True):
    persona_id: UUID | None = None


class Conversation(msgspec.Struct):
    id: UUID
    persona_id: UUID
    title: str
    message_count: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None


class Message(msgspec.Struct):
    id: UUID
    role: str
    text: str
    status: str
    reply_to: UUID | None = None
    finish_reason: str | None = None
    model: str | None = None
    created_at: datetime | None = None


class Persona(msgspec.Struct):
    id: UUID
    slug: str
    name: str
    description: str
    greeting: str
    model: str
    version: int


# -- websocket frames -------------------------------------------------------------------------


class SendFrame(msgspec.Struct, tag="send", tag_field="type", forbid_unknown_fields=True):
    conversation_id: UUID
    client_message_id: ClientId
    text: str


ClientFrame = SendFrame  # later: stop, regenerate, edit (a tagged union)
CLIENT_FRAME_TYPES = {"send"}

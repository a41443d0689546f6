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
    training_consent: bool = False  # may their messages train a model (PUT /api/me/consent)


KeepFor = Annotated[int, msgspec.Meta(ge=60, le=365 * 24 * 3600)]


class ConversationCreate(msgspec.Struct, forbid_unknown_fields=True):
    persona_id: UUID | None = None
    # a temporary conversation: it expires this many seconds from now
    expires_in_s: KeepFor | None = None


class Conversation(msgspec.Struct):
    id: UUID
    persona_id: UUID
    title: str
    message_count: int = 0
    archived: bool = False
    pinned: bool = False
    expires_at: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    via_api: bool = False  # started through /v1 with a key whose chats are listed apart


class ConversationUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """Only the fields present change."""

    title: Annotated[str, msgspec.Meta(min_length=1, max_length=80)] | msgspec.UnsetType = msgspec.UNSET
    archived: bool | msgspec.UnsetType = msgspec.UNSET
    pinned: bool | msgspec.UnsetType = msgspec.UNSET
    # seconds from now until the conversation expires; null keeps it for good
    expires_in_s: KeepFor | None | msgspec.UnsetType = msgspec.UNSET


class ShareCreated(msgspec.Struct):
    id: UUID
    url: str  # the page
    api_url: str  # the snapshot as JSON


class ShareInfo(msgspec.Struct):
    id: UUID
    created_at: datetime
    revoked: bool


class SharedMessage(msgspec.Struct):
    role: str
    text: str


class Share(msgspec.Struct):
    id: UUID
    title: str
    persona_name: str
    messages: list[SharedMessage]
    created_at: datetime


class ImportSkipped(msgspec.Struct):
    index: int
    reason: str
    duplicate: bool = False  # imported before (and still there): left out


class ImportResult(msgspec.Struct):
    imported: int
    conversation_ids: list[UUID]
    skipped: list[ImportSkipped]
    duplicates: int = 0  # of the skipped, how many were imported before


class BranchSelect(msgspec.Struct, forbid_unknown_fields=True):
    message_id: UUID


class Message(msgspec.Struct):
    """A message of the active branch. `parent_id` is the message it follows; `siblings`
    are the ids of its parent's children (itself included, oldest first): the branches
    a client can switch between."""

    id: UUID
    role: str
    text: str
    status: str
    parent_id: UUID | None = None
    siblings: list[UUID] = msgspec.field(default_factory=list)
    reply_to: UUID | None = None
    finish_reason: str | None = None
    model: str | None = None
    feedback: str | None = None  # your rating of a reply: "up" | "down"
    feedback_comment: str | None = None  # and the comment you gave with it
    imported: bool = False  # brought in from an export (or as earlier turns of a /v1 request)
    created_at: datetime | None = None


class Feedback(msgspec.Struct, forbid_unknown_fields=True):
    rating: str  # "up" | "down"
    # left out: the comment given before stays; "" removes it
    comment: Annotated[str, msgspec.Meta(max_length=1000)] | None = None


class Persona(msgspec.Struct):
    id: UUID
    slug: str
    name: str
    description: str
    greeting: str
    model: str
    version: int
    avatar: str = ""
    visibility: str = "public"
    owner_id: UUID | None = None


class PersonaDetail(msgspec.Struct):
    id: UUID
    version: int
    slug: str
    name: str
    description: str
    avatar: str
    system_prompt: str
    greeting: str
    starters: list[str]
    model: str
    temperature: float
    top_p: float
    max_tokens: int
    visibility: str
    owner_id: UUID | None
    retired: bool
    updated_at: datetime | None = None


Text = Annotated[str, msgspec.Meta(max_length=4000)]


class PersonaCreate(msgspec.Struct, forbid_unknown_fields=True):
    slug: Annotated[str, msgspec.Meta(min_length=2, max_length=48)]
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=80)]
    system_prompt: Text
    description: Text = ""
    avatar: Annotated[str, msgspec.Meta(max_length=500)] = ""
    greeting: Text = ""
    starters: list[str] = msgspec.field(default_factory=list)
    model: str = "chat"
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 96
    visibility: str = "private"


class PersonaUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """Only the fields present change; each PATCH makes a new version."""

    name: str | msgspec.UnsetType = msgspec.UNSET
    description: str | msgspec.UnsetType = msgspec.UNSET
    avatar: str | msgspec.UnsetType = msgspec.UNSET
    system_prompt: str | msgspec.UnsetType = msgspec.UNSET
    greeting: str | msgspec.UnsetType = msgspec.UNSET
    starters: list[str] | msgspec.UnsetType = msgspec.UNSET
    model: str | msgspec.UnsetType = msgspec.UNSET
    temperature: float | msgspec.UnsetType = msgspec.UNSET
    top_p: float | msgspec.UnsetType = msgspec.UNSET
    max_tokens: int | msgspec.UnsetType = msgspec.UNSET
    visibility: str | msgspec.UnsetType = msgspec.UNSET

    def changes(self) -> dict[str, object]:
        return {k: v for k, v in msgspec.structs.asdict(self).items() if v is not msgspec.UNSET}


# -- websocket frames -------------------------------------------------------------------------


class SendFrame(msgspec.Struct, tag="send", tag_field="type", forbid_unknown_fields=True):
    conversation_id: UUID
    client_message_id: ClientId
    text: str


class StopFrame(msgspec.Struct, tag="stop", tag_field="type", forbid_unknown_fields=True):
    reply_id: UUID


class RegenerateFrame(msgspec.Struct, tag="regenerate", tag_field="type", forbid_unknown_fields=True):
    """Another reply to the user message that `message_id` (a reply) answers."""

    conversation_id: UUID
    message_id: UUID


class EditFrame(msgspec.Struct, tag="edit", tag_field="type", forbid_unknown_fields=True):
    """A new branch: `text` in place of the user message `message_id`."""

    conversation_id: UUID
    message_id: UUID
    text: str
    client_message_id: ClientId | None = None


class ResumeFrame(msgspec.Struct, tag="resume", tag_field="type", forbid_unknown_fields=True):
    """After a reconnect: follow the conversation again and get the text so far of a
    reply being written, then the rest."""

    conversation_id: UUID


ClientFrame = SendFrame | StopFrame | RegenerateFrame | EditFrame | ResumeFrame
CLIENT_FRAME_TYPES = {"send", "stop", "regenerate", "edit", "resume"}

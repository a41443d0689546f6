"""`/api/conversations`: a user's conversations, their messages and branches, feedback on
replies, export and share links."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Annotated, Any
from uuid import UUID

import msgspec
from litestar import Controller, Response, delete, get, patch, post
from litestar.exceptions import NotFoundException, ValidationException
from litestar.params import Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_204_NO_CONTENT

from api import schemas
from api.ownership import check_owner
from api.services import Services
from domain.app_personas import DEFAULT_PERSONA
from domain.ids import persona_id_for
from domain.transfer import to_markdown

CONVERSATION_FIELDS = tuple(schemas.Conversation.__struct_fields__)
MESSAGE_FIELDS = set(schemas.Message.__struct_fields__)


class ConversationController(Controller):
    path = "/api/conversations"

    @post("/", status_code=HTTP_201_CREATED)
    async def create_conversation(
        self, services: Services, user_id: UUID, data: schemas.ConversationCreate | None = None
    ) -> schemas.Conversation:
        """A new conversation; with `expires_in_s`, a temporary one, gone after that time."""
        persona_id = data.persona_id if data else None
        keep_for = timedelta(seconds=data.expires_in_s) if data and data.expires_in_s else None
        conversation_id = await services.call(services.app.start_conversation, user_id, persona_id, keep_for)
        persona = persona_id or persona_id_for(DEFAULT_PERSONA)
        expires_at = datetime.now(timezone.utc) + keep_for if keep_for else None
        return schemas.Conversation(id=conversation_id, persona_id=persona, title="New chat", expires_at=expires_at)

    @get("/")
    async def list_conversations(
        self, services: Services, user_id: UUID,
        limit: Annotated[int, Parameter(ge=1, le=200)] = 50,
        before: datetime | None = None,
        before_id: UUID | None = None,
        q: Annotated[str, Parameter(max_length=200)] = "",
        archived: bool = False,
        pinned: bool | None = None,
    ) -> list[schemas.Conversation]:
        """The user's conversations, newest first, `limit` at a time: pass the last one's
        `updated_at` as `before` and its `id` as `before_id` for the next page. `q` searches
        titles and message text; `pinned` keeps only pinned (or only unpinned) chats."""
        if "\x00" in q:  # PostgreSQL text cannot hold NUL, and no stored text has one
            raise ValidationException("the search text cannot contain NUL (U+0000) characters")
        if before_id is not None and before is None:
            raise ValidationException("before_id goes with before: the updated_at of the same conversation")
        rows = await services.call(services.readmodels.conversations, user_id, limit, before, q.strip(), archived,
                                   before_id=before_id, pinned=pinned)
        return [schemas.Conversation(**r) for r in rows]

    @get("/{conversation_id:uuid}")
    async def get_conversation(
        self, services: Services, user_id: UUID, conversation_id: UUID
    ) -> schemas.Conversation:
        row = await services.call(services.readmodels.conversation, conversation_id)
        if row is None or UUID(str(row["owner_id"])) != user_id:
            raise NotFoundException("no such conversation")
        return schemas.Conversation(**{k: row[k] for k in CONVERSATION_FIELDS})

    @patch("/{conversation_id:uuid}", status_code=HTTP_204_NO_CONTENT)
    async def update_conversation(
        self, services: Services, user_id: UUID, conversation_id: UUID,
        data: schemas.ConversationUpdate,
    ) -> None:
        """Rename (`title`), archive or unarchive (`archived`), pin or unpin (`pinned`), make
        temporary or keep for good (`expires_in_s`); recorded as events."""
        title = None if data.title is msgspec.UNSET else data.title
        archived = None if data.archived is msgspec.UNSET else data.archived
        pinned = None if data.pinned is msgspec.UNSET else data.pinned
        keep_for: timedelta | None | bool = False
        if data.expires_in_s is not msgspec.UNSET:
            keep_for = timedelta(seconds=data.expires_in_s) if data.expires_in_s else None
        await services.call(services.app.update_conversation, conversation_id, user_id, title, archived, keep_for,
                            pinned)

    @delete("/{conversation_id:uuid}", status_code=HTTP_204_NO_CONTENT)
    async def delete_conversation(
        self, services: Services, user_id: UUID, conversation_id: UUID
    ) -> None:
        await services.call(services.app.delete_conversation, conversation_id, user_id)

    @get("/{conversation_id:uuid}/messages")
    async def list_messages(
        self, services: Services, user_id: UUID, conversation_id: UUID
    ) -> list[schemas.Message]:
        """The active branch, root to leaf, each message with its siblings."""
        await check_owner(services, conversation_id, user_id)
        rows = await services.call(services.readmodels.branch, conversation_id)
        return [schemas.Message(**r) for r in rows]

    @post("/{conversation_id:uuid}/branch", status_code=HTTP_200_OK)
    async def select_branch(
        self, services: Services, user_id: UUID, conversation_id: UUID,
        data: schemas.BranchSelect,
    ) -> list[schemas.Message]:
        """Switch to the branch through `message_id` (down to its newest leaf); returns it.
        Read from the events, so the answer holds even before the read model catches up."""
        await services.call(services.app.select_branch, conversation_id, user_id, data.message_id)
        nodes = await services.call(services.app.branch, conversation_id, user_id)
        return [schemas.Message(**{k: v for k, v in n.items() if k in MESSAGE_FIELDS}) for n in nodes]

    @post("/{conversation_id:uuid}/messages/{message_id:uuid}/feedback", status_code=HTTP_204_NO_CONTENT)
    async def give_feedback(
        self, services: Services, user_id: UUID, conversation_id: UUID, message_id: UUID,
        data: schemas.Feedback,
    ) -> None:
        """Rate a reply (thumbs up or down, with an optional comment), recorded as an event.
        Without `comment` the comment given before stays."""
        await services.call(services.app.give_feedback, conversation_id, user_id, message_id, data.rating, data.comment)

    @delete("/{conversation_id:uuid}/messages/{message_id:uuid}/feedback", status_code=HTTP_204_NO_CONTENT)
    async def clear_feedback(
        self, services: Services, user_id: UUID, conversation_id: UUID, message_id: UUID,
    ) -> None:
        """Take back the rating of a reply and its comment (nothing happens if it has none)."""
        await services.call(services.app.clear_feedback, conversation_id, user_id, message_id)


    @get("/{conversation_id:uuid}/export")
    async def export_conversation(
        self, services: Services, user_id: UUID, conversation_id: UUID,
        format: Annotated[str, Parameter(pattern="^(json|markdown)$")] = "json",
    ) -> Response[Any]:
        """The conversation with every branch as JSON, or its active branch as Markdown."""
        export = await services.call(services.app.export_conversation, conversation_id, user_id)
        if format == "markdown":
            return Response(
                to_markdown(export), media_type="text/markdown",  # Litestar adds "; charset=utf-8"
                headers={"Content-Disposition": f'attachment; filename="conversation-{conversation_id}.md"'},
            )
        return Response(export, headers={"Content-Disposition": f'attachment; filename="conversation-{conversation_id}.json"'})

    @post("/{conversation_id:uuid}/shares", status_code=HTTP_201_CREATED)
    async def share_conversation(
        self, services: Services, user_id: UUID, conversation_id: UUID
    ) -> schemas.ShareCreated:
        """A read-only snapshot of the active branch as it is now, readable by anyone with
        the link until revoked."""
        share_id = await services.call(services.app.share_conversation, conversation_id, user_id)
        return schemas.ShareCreated(id=share_id, url=f"/s/{share_id}", api_url=f"/api/shares/{share_id}")

    @get("/{conversation_id:uuid}/shares")
    async def list_shares(
        self, services: Services, user_id: UUID, conversation_id: UUID
    ) -> list[schemas.ShareInfo]:
        await check_owner(services, conversation_id, user_id)
        rows = await services.call(services.readmodels.shares, conversation_id)
        return [schemas.ShareInfo(**r) for r in rows]

    @delete("/{conversation_id:uuid}/shares/{share_id:uuid}", status_code=HTTP_204_NO_CONTENT)
    async def revoke_share(
        self, services: Services, user_id: UUID, conversation_id: UUID, share_id: UUID
    ) -> None:
        await services.call(services.app.revoke_share, conversation_id, user_id, share_id)

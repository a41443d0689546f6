"""Who owns a conversation, for the routes and the websocket that act on it for a user."""

from __future__ import annotations

from uuid import UUID

from litestar.exceptions import NotFoundException

from api.services import Services
from domain.conversation_errors import ConversationNotFound


async def owner_of(services: Services, conversation_id: UUID) -> UUID | None:
    """The conversation's owner: the read model answers, the event store settles a
    conversation too new to have reached it."""
    row = await services.call(services.readmodels.conversation, conversation_id)
    if row is not None:
        return UUID(str(row["owner_id"]))
    try:
        return await services.call(services.app.conversation_owner, conversation_id)
    except ConversationNotFound:
        return None


async def check_owner(services: Services, conversation_id: UUID, user_id: UUID) -> None:
    """404 unless `user_id` owns the conversation."""
    if await owner_of(services, conversation_id) != user_id:
        raise NotFoundException("no such conversation")

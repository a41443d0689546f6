"""What the pages read, in the shapes the templates want, through the services the API uses.

Everything comes from the read models, as the API's answers do. After a page's write,
`settle` waits until the read models have applied the changed aggregate's events, so the
page the browser is redirected to shows what it just did (read-your-writes), within a
bound."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from uuid import UUID

from psycopg.sql import SQL, Identifier

from api.services import Services
from domain.conversation_errors import ConversationNotFound
from domain.persona import PersonaNotFound
from projections.positions import read_positions

SETTLE_TIMEOUT_S = 5.0  # past it the page shows what the read models have (the projector is behind)
FALLBACK_PERSONA: dict[str, Any] = {
    "id": None, "name": "Assistant", "avatar": "", "description": "", "greeting": "", "starters": [],
}


def _newest_notification(services: Services, originator_id: UUID) -> int:
    """The notification id of the aggregate's newest stored event (0: none)."""
    recorder: Any = services.app.recorder
    query = SQL("SELECT max(notification_id) AS n FROM {}.{} WHERE originator_id = %s").format(
        Identifier(recorder.datastore.schema), Identifier(recorder.events_table_name)
    )
    with recorder.datastore.get_connection() as conn, conn.cursor() as curs:
        curs.execute(query, (originator_id,))
        row = curs.fetchone()
    return int(row["n"] or 0) if row else 0


async def settle(services: Services, originator_id: UUID, timeout: float = SETTLE_TIMEOUT_S) -> bool:
    """Wait until the read models have applied every event of `originator_id` (an
    aggregate a page just changed) stored so far, on whichever partition it lives.
    False when the bound ran out first (the page then shows slightly older data)."""
    target = await services.call(_newest_notification, services, originator_id)
    deadline = time.monotonic() + timeout
    while True:
        positions = await services.call(read_positions, services.readmodels, services.settings.partitions)
        if positions.is_applied(originator_id, target):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)


def _plain(row: Any) -> dict[str, Any]:
    return dict(row) if row is not None else {}


async def conversation(services: Services, conversation_id: UUID, user_id: UUID) -> dict[str, Any]:
    """The conversation's row, or ConversationNotFound unless the user owns it."""
    row = await services.call(services.readmodels.conversation, conversation_id)
    if row is None or row["owner_id"] != user_id or row.get("deleted"):
        raise ConversationNotFound(str(conversation_id))
    return _plain(row)


async def thread(services: Services, conversation_id: UUID) -> list[dict[str, Any]]:
    """The active branch, root to leaf (as the API's messages), each message with its
    place among its siblings: `index`, and the `previous` and `next` sibling ids."""
    messages = []
    for row in await services.call(services.readmodels.branch, conversation_id):
        siblings = list(row["siblings"])
        index = siblings.index(row["id"])
        messages.append({
            **row, "siblings": siblings, "index": index,
            "previous": siblings[index - 1] if index > 0 else None,
            "next": siblings[index + 1] if index + 1 < len(siblings) else None,
        })
    return messages


async def persona(services: Services, persona_id: UUID, user_id: UUID | None) -> dict[str, Any]:
    """The persona as the user may see it; a stand-in when it is gone (retired, private)."""
    try:
        return await services.call(services.app.visible_persona, persona_id, user_id)
    except PersonaNotFound:
        return {**FALLBACK_PERSONA, "id": persona_id}


async def personas(services: Services, user_id: UUID | None) -> list[dict[str, Any]]:
    return [_plain(r) for r in await services.call(services.readmodels.personas, user_id)]


async def shares(services: Services, conversation_id: UUID) -> list[dict[str, Any]]:
    """The conversation's share links that still work, oldest first."""
    rows = await services.call(services.readmodels.shares, conversation_id)
    return [_plain(r) for r in rows if not r["revoked"]]


async def user_shares(services: Services, user_id: UUID) -> list[dict[str, Any]]:
    """The user's share links that still work, across their chats, newest first."""
    return [_plain(r) for r in await services.call(services.readmodels.shares_of, user_id)]

"""The chat list through the API: keyset pages (a time and an id, so chats updated in the
same instant are neither skipped nor repeated), pins, and their validation."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from uuid import UUID

import pytest

from chatbot.ops.launcher import Stack
from projections.readmodels import ReadModelRecorder, read_model_recorder
from tests.client import ChatClient
from tests.ui.conftest import export_of
from tests.waiting import async_eventually

pytestmark = pytest.mark.integration


def quote(moment: str) -> str:
    return moment.replace("+", "%2B")


def set_times(readmodels: ReadModelRecorder, times: dict[UUID, str]) -> None:
    """Set conversations' `updated_at` in the read model by hand."""
    with readmodels.datastore.transaction(commit=True) as curs:
        for conversation_id, moment in times.items():
            curs.execute("UPDATE rm_conversations SET updated_at = %s WHERE id = %s", (moment, conversation_id))


async def listing(client: ChatClient, query: str = "") -> list[dict]:
    r = await client.get(f"/api/conversations{query}")
    assert r.status_code == 200, r.text
    return list(r.json())


async def test_pages_by_time_and_id_and_pins(client: ChatClient, stack: Stack) -> None:
    r = await client.http.post("/api/import", content=json.dumps(export_of(7)),
                               headers={**client.headers, "content-type": "application/json"}, timeout=120)
    assert r.status_code == 201 and r.json()["imported"] == 7, r.text
    everything = await async_eventually(lambda: listing(client, "?limit=50"), until=lambda rows: len(rows) == 7,
                                        timeout=10, interval=0.05, what="the seven imported chats listed")
    order = [(c["updated_at"], c["id"]) for c in everything]
    assert order == sorted(order, reverse=True)  # newest first, ties broken by id

    # five of them last active in the same instant: pages of two must still list each once.
    # (The rows are set by hand and put back after: a rebuild later in the session compares
    # the read models with what the events give.)
    tied = everything[1:6]
    readmodels = read_model_recorder(stack.settings.eventsourcing_env())
    try:
        set_times(readmodels, {UUID(c["id"]): everything[1]["updated_at"] for c in tied})
        everything = await listing(client, "?limit=50")
        order = [(c["updated_at"], c["id"]) for c in everything]
        assert order == sorted(order, reverse=True) and len({c["updated_at"] for c in everything[1:6]}) == 1

        seen: list[dict] = []
        page = await listing(client, "?limit=2")
        while page:
            seen += page
            last = page[-1]
            page = await listing(client, f"?limit=2&before={quote(last['updated_at'])}&before_id={last['id']}")
        assert [c["id"] for c in seen] == [c["id"] for c in everything]
        # `before` alone (the older API) pages by time only: a tie at the page's edge is skipped
        older = await listing(client, f"?before={quote(everything[1]['updated_at'])}")
        assert [c["id"] for c in older] == [c["id"] for c in everything[6:]]
    finally:
        set_times(readmodels, {UUID(c["id"]): c["updated_at"] for c in tied})
        readmodels.datastore.close()

    chosen = everything[4]["id"]
    r = await client.http.patch(f"/api/conversations/{chosen}", json={"pinned": True}, headers=client.headers)
    assert r.status_code == 204, r.text
    pinned = await async_eventually(lambda: listing(client, "?pinned=true"), timeout=10, interval=0.05,
                                    what="a pinned chat listed")
    assert [c["id"] for c in pinned] == [chosen] and pinned[0]["pinned"] is True
    unpinned = await listing(client, "?pinned=false")
    assert len(unpinned) == 6 and chosen not in {c["id"] for c in unpinned}
    assert (await client.get(f"/api/conversations/{chosen}")).json()["pinned"] is True

    for bad in (f"?before_id={chosen}", "?pinned=perhaps", "?before_id=not-a-uuid&before=2026-12-06T00:00:00Z"):
        r = await client.get(f"/api/conversations{bad}")
        assert r.status_code == 400, (bad, r.text)
    r = await client.http.patch(f"/api/conversations/{chosen}", json={"pinned": "yes"}, headers=client.headers)
    assert r.status_code == 400, r.text


async def test_a_chat_left_empty_is_discarded_by_the_retention_job(client: ChatClient, stack: Stack, chat_app) -> None:
    empty, renamed = await client.start_conversation(), await client.start_conversation()
    r = await client.http.patch(f"/api/conversations/{renamed}", json={"title": "Later"}, headers=client.headers)
    assert r.status_code == 204, r.text
    readmodels = read_model_recorder(stack.settings.eventsourcing_env())
    try:
        await async_eventually(lambda: client.get(f"/api/conversations/{renamed}"),  # both projected
                               until=lambda r: r.json().get("title") == "Later", timeout=10, interval=0.05,
                               what="the renamed chat projected", fail=False)
        named = await asyncio.to_thread(readmodels.empty_conversations, timedelta(0))
        assert {UUID(empty), UUID(renamed)} <= set(named)  # the read model names candidates only
        assert UUID(empty) not in await asyncio.to_thread(readmodels.empty_conversations, timedelta(days=1))
    finally:
        readmodels.datastore.close()
    # the events decide: the renamed one is kept
    assert await asyncio.to_thread(chat_app.discard_empty_conversation, UUID(empty), timedelta(0))
    assert not await asyncio.to_thread(chat_app.discard_empty_conversation, UUID(renamed), timedelta(0))
    await async_eventually(lambda: client.get(f"/api/conversations/{empty}"), until=lambda r: r.status_code == 404,
                           timeout=10, interval=0.05, what="the discarded chat gone (404)")
    assert (await client.get(f"/api/conversations/{renamed}")).status_code == 200

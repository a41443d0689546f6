"""Feedback on replies as events, and per-user rate limits across the API."""

from __future__ import annotations

import asyncio
import time
import uuid
from uuid import UUID

import pytest

from domain.conversation import Conversation
from domain.persona import Persona
from tests.client import ChatClient, collect_reply, recv, send
from tests.waiting import async_eventually

pytestmark = pytest.mark.integration


def terse(chat_app) -> str:
    persona = Persona(slug=f"terse-{uuid.uuid4().hex[:8]}", name="Terse", description="", greeting="",
                      system_prompt="You are a polite assistant who keeps answers short.", model="chat",
                      temperature=0.7, top_p=0.95, max_tokens=2)
    chat_app.save(persona)
    return str(persona.id)


async def test_a_user_rates_a_reply_and_the_rating_is_an_event_on_that_reply(
    client: ChatClient, other_client: ChatClient, chat_app
) -> None:
    conversation_id = await client.start_conversation()
    async with client.ws() as ws:
        await send(ws, conversation_id, "Hello!")
        accepted, _, _ = await collect_reply(ws)
    reply_id = accepted["reply_id"]
    url = f"/api/conversations/{conversation_id}/messages/{reply_id}/feedback"
    r = await client.http.post(url, json={"rating": "down", "comment": "off topic"}, headers=client.headers)
    assert r.status_code == 204, r.text
    r = await client.http.post(url, json={"rating": "up"}, headers=client.headers)  # a thumb keeps the comment
    assert r.status_code == 204
    feedback = [e for e in chat_app.events.get(UUID(conversation_id)) if isinstance(e, Conversation.FeedbackGiven)]
    assert [(str(e.reply_id), e.rating, e.comment) for e in feedback] == [
        (reply_id, "down", "off topic"), (reply_id, "up", "off topic")]
    messages = await client.messages_when(conversation_id, lambda ms: ms[-1]["feedback"] == "up")
    assert (messages[-1]["feedback"], messages[-1]["feedback_comment"]) == ("up", "off topic")

    r = await client.http.delete(url, headers=client.headers)  # the rating taken back
    assert r.status_code == 204, r.text
    messages = await client.messages_when(conversation_id, lambda ms: ms[-1]["feedback"] is None)
    assert (messages[-1]["feedback"], messages[-1]["feedback_comment"]) == (None, None)
    assert type(list(chat_app.events.get(UUID(conversation_id)))[-1]).__name__ == "FeedbackCleared"
    assert (await other_client.http.delete(url, headers=other_client.headers)).status_code == 404

    assert (await client.http.post(url, json={"rating": "meh"}, headers=client.headers)).status_code == 400
    assert (await client.http.post(url, json={"rating": "up", "comment": "x" * 1001}, headers=client.headers)).status_code == 400
    wrong = f"/api/conversations/{conversation_id}/messages/{uuid.uuid4()}/feedback"
    assert (await client.http.post(wrong, json={"rating": "up"}, headers=client.headers)).status_code == 404
    assert (await other_client.http.post(url, json={"rating": "down"}, headers=other_client.headers)).status_code == 404


async def test_a_user_over_the_message_rate_is_told_when_to_retry(client: ChatClient, chat_app) -> None:
    conversation_id = await client.start_conversation(terse(chat_app))
    # The limit counts per calendar minute (a fixed window): start early in one, so all
    # seven sends fall in the same window.
    into_minute = time.time() % 60
    if into_minute > 30:
        await asyncio.sleep(60 - into_minute + 0.5)
    async with client.ws() as ws:
        for i in range(6):  # the test stack allows 6 messages a minute
            await send(ws, conversation_id, f"message {i}")
            await collect_reply(ws)
        await send(ws, conversation_id, "one too many")
        frame = await recv(ws)
    assert frame["type"] == "error" and frame["code"] == "rate_limited"
    assert 0 < frame["retry_after"] <= 61 and "a minute" in frame["message"]
    conversation: Conversation = chat_app.repository.get(UUID(conversation_id))
    assert [m["text"] for m in conversation.messages if m["role"] == "user"] == [f"message {i}" for i in range(6)]


async def test_a_reply_still_counts_against_the_quota_when_its_conversation_is_deleted_meanwhile(
    client: ChatClient, chat_app, stack
) -> None:
    from projections.readmodels import read_model_recorder

    readmodels = read_model_recorder(stack.settings.eventsourcing_env())
    try:
        user = UUID(client.user_id)
        before = readmodels.tokens_today(user)
        conversation_id = await client.start_conversation()
        async with client.ws() as ws:
            await send(ws, conversation_id, "Tell me about the sea.")
            accepted = await recv(ws)
            assert accepted["type"] == "accepted"
            r = await client.http.delete(f"/api/conversations/{conversation_id}", headers=client.headers)
            assert r.status_code == 204, r.text
        reply_id = UUID(accepted["reply_id"])
        # the reply goes on and is recorded, then projected
        used = await async_eventually(lambda: readmodels.tokens_today(user), until=lambda used: used > before,
                                      timeout=60, interval=0.1, what="the reply's tokens counted for the day")
        conversation: Conversation = chat_app.repository.get(UUID(conversation_id))
        reply = conversation.reply(reply_id)
        assert reply["status"] == "complete"
        assert used - before == reply["prompt_tokens"] + reply["completion_tokens"] > 0
    finally:
        readmodels.datastore.close()

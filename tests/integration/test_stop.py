"""Stopping a reply: the generation ends wherever it runs, and the partial reply is kept."""

from __future__ import annotations

import json
import uuid
from uuid import UUID

import pytest

from domain.conversation import Conversation
from tests.client import ChatClient, recv, send
from tests.integration.test_reliability_and_storage import long_talker, outcome_events

pytestmark = pytest.mark.integration


async def test_a_stopped_reply_ends_early_with_its_partial_text_recorded(client: ChatClient, chat_app) -> None:
    conversation_id = await client.start_conversation(long_talker(chat_app))  # 300 tokens unless stopped
    async with client.ws() as ws:
        await send(ws, conversation_id, "Tell me a very long story.")
        accepted = await recv(ws)
        first = await recv(ws)
        assert first["type"] == "token"
        await ws.send(json.dumps({"type": "stop", "reply_id": accepted["reply_id"]}))
        tokens = [first]
        while (frame := await recv(ws))["type"] == "token":
            tokens.append(frame)
    assert frame["type"] == "reply" and frame["finish_reason"] == "cancelled"
    assert frame["text"] == "".join(t["text"] for t in tokens)
    assert outcome_events(chat_app, conversation_id, accepted["reply_id"]) == ["ReplyCompleted"]
    conversation: Conversation = chat_app.repository.get(UUID(conversation_id))
    reply = conversation.reply(UUID(accepted["reply_id"]))
    assert reply["finish_reason"] == "cancelled" and 0 < reply["completion_tokens"] < 300
    # the conversation goes on
    async with client.ws() as ws:
        await send(ws, conversation_id, "Thanks, that's enough.")
        assert (await recv(ws))["type"] == "accepted"


async def test_nobody_can_stop_another_users_reply(client: ChatClient, other_client: ChatClient) -> None:
    conversation_id = await client.start_conversation()
    async with client.ws() as ws:
        await send(ws, conversation_id, "Hello!")
        accepted = await recv(ws)
    async with other_client.ws() as ws:
        await ws.send(json.dumps({"type": "stop", "reply_id": accepted["reply_id"]}))
        assert (await recv(ws))["code"] == "not_found"
        await ws.send(json.dumps({"type": "stop", "reply_id": str(uuid.uuid4())}))
        assert (await recv(ws))["code"] == "not_found"

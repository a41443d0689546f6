"""A socket's frames are handled concurrently across conversations and in order within one;
sends that arrive together are rate-limited exactly as if they came one by one."""

from __future__ import annotations

import asyncio
import json
import uuid
from uuid import UUID

import pytest

from domain.conversation import Conversation
from tests.client import ChatClient, recv

pytestmark = pytest.mark.integration


async def answers(ws, wanted: set[str], timeout: float = 60) -> dict[str, list[dict]]:
    """The `accepted` and `error` frames for each client message id, until each has one."""
    got: dict[str, list[dict]] = {}
    deadline = asyncio.get_running_loop().time() + timeout
    while not wanted <= set(got):
        frame = await recv(ws, timeout=max(0.1, deadline - asyncio.get_running_loop().time()))
        if frame["type"] in ("accepted", "error") and frame.get("client_message_id") in wanted:
            got.setdefault(frame["client_message_id"], []).append(frame)
    await asyncio.sleep(0.3)  # a second answer to any of them would arrive by now
    while True:
        try:
            frame = await recv(ws, timeout=0.2)
        except (TimeoutError, asyncio.TimeoutError):
            return got
        if frame["type"] in ("accepted", "error") and frame.get("client_message_id") in wanted:
            got[frame["client_message_id"]].append(frame)


async def test_sends_at_once_to_many_conversations_each_get_one_answer_and_the_limit_holds_exactly(
    client: ChatClient, chat_app
) -> None:
    conversations = [await client.start_conversation() for _ in range(10)]
    ids = {c: str(uuid.uuid4()) for c in conversations}
    async with client.ws() as ws:
        for c in conversations:  # without waiting: they are handled side by side
            await ws.send(json.dumps({"type": "send", "conversation_id": c,
                                      "client_message_id": ids[c], "text": "hello"}))
        got = await answers(ws, set(ids.values()))
    assert all(len(frames) == 1 for frames in got.values()), got
    outcomes = [frames[0]["type"] if frames[0]["type"] == "accepted" else frames[0]["code"] for frames in got.values()]
    assert sorted(outcomes) == ["accepted"] * 6 + ["rate_limited"] * 4, "the test stack allows 6 a minute"
    posted = 0
    for c in conversations:
        conversation: Conversation = chat_app.repository.get(UUID(c))
        mine = [m for m in conversation.messages if m["role"] == "user"]
        accepted = got[ids[c]][0]["type"] == "accepted"
        assert len(mine) == (1 if accepted else 0), "a message is posted exactly when it was accepted"
        posted += len(mine)
    assert posted == 6


async def test_frames_of_one_conversation_are_answered_in_the_order_they_came(client: ChatClient) -> None:
    conversation_id = await client.start_conversation()
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    async with client.ws() as ws:
        for cmid in (first, first, second):  # a send, its retry, and another while the reply is pending
            await ws.send(json.dumps({"type": "send", "conversation_id": conversation_id,
                                      "client_message_id": cmid, "text": "hello"}))
        frames = []
        while len(frames) < 3:
            frame = await recv(ws)
            if frame["type"] in ("accepted", "error"):
                frames.append(frame)
    assert [(f["type"], f.get("duplicate"), f["client_message_id"]) for f in frames[:2]] == [
        ("accepted", False, first), ("accepted", True, first)], frames
    assert frames[0]["reply_id"] == frames[1]["reply_id"]
    assert frames[2]["type"] == "error" and frames[2]["code"] == "rejected" and frames[2]["client_message_id"] == second

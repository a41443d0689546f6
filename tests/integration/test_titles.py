"""The model writes a chat's title after its first reply, through the same Triton model
(workers/titles.py); what is not a title leaves the rule's title in place."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.client import ChatClient, collect_reply, recv, send
from tests.waiting import async_eventually
from workers.titles import clean_title

pytestmark = pytest.mark.integration
LOGS = Path(__file__).parents[1] / "artifacts" / "logs"
# Greedily, SmolLM2 titles the first three (e.g. "Fixing a flat bicycle tyre") and answers
# the last with a sentence, which is not kept.
PROMPTS = ("What do penguins eat in winter?", "Tell me about the history of Rome", "How do I fix a flat bicycle tyre?",
           "Explain photosynthesis simply")


def refused(conversation_id: str) -> bool:
    """Whether a worker logged that the conversation keeps the rule's title."""
    needle = f"conversation {conversation_id} keeps its title"
    return any(needle in log.read_text(errors="replace") for log in LOGS.glob("worker-*.log"))


async def title_frame(ws: Any, conversation_id: str, timeout: float = 30) -> dict[str, Any] | None:
    """The `title` frame of the conversation, or None once a worker logged that the
    conversation keeps the rule's title (or after `timeout`)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline and not refused(conversation_id):
        try:
            frame = await recv(ws, timeout=0.5)
        except (TimeoutError, asyncio.TimeoutError):
            continue
        if frame["type"] == "title":
            return frame
    return None


async def test_the_model_titles_a_chat_after_its_first_reply(client: ChatClient, chat_app) -> None:
    written = {}
    for prompt in PROMPTS:
        conversation_id = await client.start_conversation()
        async with client.ws() as ws:
            await send(ws, conversation_id, prompt)
            await collect_reply(ws)
            frame = await title_frame(ws, conversation_id)
        titled = await async_eventually(
            lambda: [e for e in chat_app.events.get(uuid.UUID(conversation_id)) if type(e).__name__ == "Titled"],
            until=lambda titled: len(titled) == 2 or refused(conversation_id), timeout=30, interval=0.1,
            what="the model's title, or the worker's word that it was not one", fail=False)
        assert titled[0].title == prompt and not getattr(titled[0], "model", "")  # by rule, at once
        shown = await client.titles_when_shown(chat_app, conversation_id)
        if len(titled) == 2:
            title = titled[1].title
            assert titled[1].model == "chat/1"
            assert clean_title(title, "stop", prompt) == title and title != prompt
            assert shown[-1] == title  # the chat list shows it
            assert frame == {"type": "title", "conversation_id": conversation_id, "title": title}  # and the page
            written[prompt] = title
        else:
            assert frame is None and shown == [prompt]
    print(f"model titles: {written}")
    assert len(set(written) & set(PROMPTS[:3])) >= 2, written

    # a chat the user renamed before the model's title came keeps the user's title
    conversation_id = await client.start_conversation()
    async with client.ws() as ws:
        await send(ws, conversation_id, PROMPTS[0])
        await collect_reply(ws)
    r = await client.http.patch(f"/api/conversations/{conversation_id}", json={"title": "Mine"}, headers=client.headers)
    assert r.status_code == 204, r.text
    await asyncio.sleep(3)
    assert [c["title"] for c in (await client.get("/api/conversations")).json() if c["id"] == conversation_id] == ["Mine"]

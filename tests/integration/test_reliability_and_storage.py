"""Exactly one outcome when a worker dies mid-generation, and no plaintext at rest."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path
from uuid import UUID

import psycopg
import pytest
from nats.js.api import DeliverPolicy

from chatbot.ops.launcher import Stack
from domain.conversation import Conversation
from domain.persona import Persona
from tests.client import ChatClient, collect_reply, recv, send

pytestmark = pytest.mark.integration


def long_talker(chat_app) -> str:
    """A persona whose replies run for hundreds of tokens (as many as the suite's cap
    allows), so a kill lands mid-generation."""
    persona = Persona(
        slug=f"long-talker-{uuid.uuid4().hex[:8]}", name="Long Talker", description="talks at length",
        system_prompt="You are a helpful, friendly assistant.", greeting="Hello.", model="chat",
        temperature=0.8, top_p=0.95, max_tokens=300, min_tokens=300,
    )
    chat_app.save(persona)
    return str(persona.id)


def outcome_events(chat_app, conversation_id: str, reply_id: str) -> list[str]:
    return [
        type(e).__name__ for e in chat_app.events.get(UUID(conversation_id))
        if isinstance(e, (Conversation.ReplyCompleted, Conversation.ReplyFailed))
        and str(e.reply_id) == reply_id
    ]


async def test_a_request_redelivered_after_a_worker_dies_mid_generation_ends_with_one_reply(
    stack: Stack, client: ChatClient, chat_app
) -> None:
    conversation_id = await client.start_conversation(long_talker(chat_app))
    worker = stack.children["worker-0"]
    async with client.ws() as ws:
        await send(ws, conversation_id, "Tell me a long story about the sea.")
        accepted = await recv(ws)
        assert accepted["type"] == "accepted"
        first_token = await recv(ws)
        assert first_token["type"] == "token"
        worker.kill(signal.SIGKILL)  # mid-generation: no outcome, no ack
        worker.proc.wait()
        assert outcome_events(chat_app, conversation_id, accepted["reply_id"]) == []
        worker.start()  # JetStream redelivers the request to the new worker after ack_wait
        _, tokens, reply = await collect_reply(ws, timeout=180)

    assert reply["reply_id"] == accepted["reply_id"] and reply["finish_reason"] == "length"
    assert outcome_events(chat_app, conversation_id, accepted["reply_id"]) == ["ReplyCompleted"]
    conversation: Conversation = chat_app.repository.get(UUID(conversation_id))
    expected = min(300, stack.settings.max_reply_tokens or 300)  # the suite caps replies (tests/conftest.py)
    assert conversation.reply(UUID(accepted["reply_id"]))["completion_tokens"] == expected
    # the client saw the whole reply: the first token, then the rest without repeats
    assert first_token["text"] + "".join(t["text"] for t in tokens) == reply["text"]


async def test_user_text_is_never_stored_in_plaintext_in_postgres_or_jetstream(
    stack: Stack, client: ChatClient, chat_app
) -> None:
    secret = f"my-secret-marmalade-{uuid.uuid4().hex[:10]}"
    conversation_id = await client.start_conversation()
    async with client.ws() as ws:
        await send(ws, conversation_id, f"Please remember {secret}")
        await collect_reply(ws)
    # Wait until the projection has it: proves the text went all the way through.
    messages = await client.messages_when(conversation_id, lambda ms: any(secret in m["text"] for m in ms))
    assert any(secret in m["text"] for m in messages)

    # The event table's stored bytes: encrypted...
    with psycopg.connect(stack.settings.pg_conninfo) as conn:
        states = [bytes(r[0]) for r in conn.execute("SELECT state FROM chat_events")]
    assert states and not any(secret.encode() in s for s in states)
    # ...yet decrypting them with the application's cipher gives the text back.
    events = list(chat_app.events.get(UUID(conversation_id)))
    assert any(secret in getattr(e, "text", "") for e in events)

    # The stream's payloads as a consumer sees them, and the broker's files on disk.
    import nats

    nc = await nats.connect(stack.settings.nats_url)
    js = nc.jetstream()
    sub = await js.subscribe("chat.ev.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    info = await js.stream_info(stack.settings.stream_name)
    payloads = []
    for _ in range(info.state.messages):
        msg = await sub.next_msg(timeout=5)
        payloads.append(msg.data)
    await nc.close()
    assert len(payloads) == info.state.messages > 0
    assert not any(secret.encode() in p for p in payloads)
    store = Path(stack.settings.data_dir) / "nats" / "jetstream"
    files = [p for p in store.rglob("*") if p.is_file()]
    assert files and not any(secret.encode() in p.read_bytes() for p in files)


async def test_every_stored_event_reaches_the_stream_exactly_once(stack: Stack, client: ChatClient, chat_app) -> None:
    conversation_id = await client.start_conversation()
    async with client.ws() as ws:
        await send(ws, conversation_id, "Hi there!")
        await collect_reply(ws)
    await asyncio.sleep(0.5)  # the relay publishes within milliseconds of the commit
    with psycopg.connect(stack.settings.pg_conninfo) as conn:
        stored = conn.execute("SELECT count(*) FROM chat_events").fetchone()[0]
    import nats

    nc = await nats.connect(stack.settings.nats_url)
    info = await nc.jetstream().stream_info(stack.settings.stream_name)
    await nc.close()
    assert info.state.messages == stored

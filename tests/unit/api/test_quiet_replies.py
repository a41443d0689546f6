"""A reply whose end was lost on the way (core NATS delivers at most once) still ends for
the client: the socket looks a quiet reply up in the read model and sends its end from
there, once. The session runs against fakes of its services; no servers."""

from __future__ import annotations

import asyncio
import uuid

import pytest

import api.reply_stream as reply_stream
from api.chat_socket import ChatSession
from chatbot.bus.messaging import ReplyDone, TokenDelta, token_encoder
from tests.fakes import FakeServices, frames


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reply_stream, "QUIET_S", 0.05)


async def test_a_reply_whose_end_was_lost_ends_from_the_read_model_once(quick: None) -> None:
    services = FakeServices()
    session = ChatSession(None, uuid.uuid4(), services)  # type: ignore[arg-type]
    conversation_id, reply_id = uuid.uuid4(), uuid.uuid4()
    rid = str(reply_id)
    session.await_end(rid, conversation_id)
    services.readmodels.rows[reply_id] = {"status": "pending", "text": "", "finish_reason": None}
    await asyncio.sleep(0.2)
    assert frames(session) == [] and services.readmodels.lookups > 0  # still being written: nothing sent

    services.readmodels.rows[reply_id] = {"status": "complete", "text": "Ahoy there!", "finish_reason": "stop"}
    await asyncio.sleep(0.2)
    # the text it never streamed comes as one last delta (tokens add up to the reply), then its end
    assert frames(session) == [
        {"type": "token", "conversation_id": str(conversation_id), "reply_id": rid, "text": "Ahoy there!"},
        {"type": "reply", "conversation_id": str(conversation_id), "reply_id": rid,
         "text": "Ahoy there!", "finish_reason": "stop"},
    ]
    # the lost end turns up after all: the client does not get the reply twice
    session.on_token_message(conversation_id, token_encoder.encode(ReplyDone(rid, "Ahoy there!", "stop")))
    assert frames(session) == []
    await asyncio.sleep(0.1)
    watcher = reply_stream.quiet_replies(services)  # type: ignore[arg-type]
    assert watcher.task is not None and watcher.task.done() and not watcher.sessions  # nothing left to wait for


async def test_a_reply_that_streams_or_ends_as_usual_is_never_looked_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reply_stream, "QUIET_S", 0.5)
    services = FakeServices()
    session = ChatSession(None, uuid.uuid4(), services)  # type: ignore[arg-type]
    conversation_id, reply_id = uuid.uuid4(), uuid.uuid4()
    rid = str(reply_id)
    session.await_end(rid, conversation_id)
    for i in range(6):  # tokens keep coming: the reply is not quiet
        session.on_token_message(conversation_id, token_encoder.encode(TokenDelta(rid, i, "x")))
        await asyncio.sleep(0.02)
    session.on_token_message(conversation_id, token_encoder.encode(ReplyDone(rid, "xxxxxx", "length")))
    await asyncio.sleep(0.6)
    watcher = reply_stream.quiet_replies(services)  # type: ignore[arg-type]
    assert services.readmodels.lookups == 0 and watcher.task is not None and watcher.task.done()
    sent = frames(session)
    assert "".join(f["text"] for f in sent if f["type"] == "token") == "xxxxxx"
    assert [f["type"] for f in sent][-1] == "reply" and sum(f["type"] == "reply" for f in sent) == 1


async def test_a_reply_whose_deltas_went_by_unheard_still_adds_up_from_its_end() -> None:
    """Deltas this socket never heard (lost with a NATS node, or published before a resumed
    socket followed the conversation): the client's text stays a prefix of the reply, and
    what it lacks goes out as one delta before the `reply`, so the tokens add up to it."""
    session = ChatSession(None, uuid.uuid4(), FakeServices())  # type: ignore[arg-type]
    conversation_id, rid = uuid.uuid4(), str(uuid.uuid4())
    text = "Ahoy! there, matey"

    def delta(offset: int, part: str) -> None:
        session.on_token_message(conversation_id, token_encoder.encode(TokenDelta(rid, offset, part)))

    delta(0, "Ahoy")
    delta(6, "there,")  # "! " went by unheard
    delta(12, " matey")
    session.on_token_message(conversation_id, token_encoder.encode(ReplyDone(rid, text, "stop")))
    sent = frames(session)
    assert [f["type"] for f in sent] == ["token", "token", "reply"]
    assert "".join(f["text"] for f in sent if f["type"] == "token") == text  # no gap, nothing twice

    # a resumed socket that heard only later deltas gets the whole text at the end
    rid = str(uuid.uuid4())
    delta(6, "there,")
    session.on_token_message(conversation_id, token_encoder.encode(ReplyDone(rid, text, "stop")))
    assert [(f["type"], f["text"]) for f in frames(session)] == [("token", text), ("reply", text)]

    # a reply streamed whole gets no extra delta
    rid = str(uuid.uuid4())
    delta(0, text)
    session.on_token_message(conversation_id, token_encoder.encode(ReplyDone(rid, text, "stop")))
    assert [f["type"] for f in frames(session)] == ["token", "reply"]


async def test_the_quiet_replies_of_every_socket_are_looked_up_in_one_query(quick: None) -> None:
    services = FakeServices()
    sessions = [ChatSession(None, uuid.uuid4(), services) for _ in range(50)]  # type: ignore[arg-type]
    replies = {}
    for session in sessions:
        conversation_id, reply_id = uuid.uuid4(), uuid.uuid4()
        replies[reply_id] = (session, conversation_id)
        session.await_end(str(reply_id), conversation_id)
        services.readmodels.rows[reply_id] = {"status": "complete", "text": "done", "finish_reason": "stop"}
    await asyncio.sleep(0.2)
    assert services.readmodels.lookups == 1 and set(services.readmodels.looked_up[0]) == set(replies)
    for session in sessions:  # each socket got its own reply's end, once
        assert [f["type"] for f in frames(session)] == ["token", "reply"]
    # a socket that closes stops being watched
    late = ChatSession(None, uuid.uuid4(), services)  # type: ignore[arg-type]
    late.await_end(str(uuid.uuid4()), uuid.uuid4())
    reply_stream.quiet_replies(services).forget(late)  # type: ignore[arg-type]
    await asyncio.sleep(0.2)
    assert services.readmodels.lookups == 1


async def test_an_end_announced_again_or_a_late_delta_is_dropped() -> None:
    """A redelivered request whose outcome exists is announced again, and a second worker
    racing the first can still send deltas: after a reply's end, nothing more of it goes out."""
    session = ChatSession(None, uuid.uuid4(), FakeServices())  # type: ignore[arg-type]
    conversation_id, rid = uuid.uuid4(), str(uuid.uuid4())
    session.on_token_message(conversation_id, token_encoder.encode(TokenDelta(rid, 0, "Hello")))
    session.on_token_message(conversation_id, token_encoder.encode(ReplyDone(rid, "Hello", "stop")))
    session.on_token_message(conversation_id, token_encoder.encode(TokenDelta(rid, 2, "llo")))
    session.on_token_message(conversation_id, token_encoder.encode(ReplyDone(rid, "Hello", "stop")))
    assert [(f["type"], f["text"]) for f in frames(session)] == [("token", "Hello"), ("reply", "Hello")]


async def test_a_reply_whose_end_went_out_is_not_waited_for_again() -> None:
    """A duplicate send (same client_message_id) or a resume that names a reply whose end
    this socket already sent: nothing to look up later, and no end is sent twice."""
    session = ChatSession(None, uuid.uuid4(), FakeServices())  # type: ignore[arg-type]
    conversation_id, rid = uuid.uuid4(), str(uuid.uuid4())
    session.on_token_message(conversation_id, token_encoder.encode(ReplyDone(rid, "Hi", "stop")))
    assert [f["type"] for f in frames(session)] == ["token", "reply"]
    session.await_end(rid, conversation_id)
    assert rid not in session.awaited

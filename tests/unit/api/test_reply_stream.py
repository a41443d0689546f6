"""Following a reply's token stream (api/reply_stream.py), the logic the websocket and
`/v1` share: the text a client lacks of each delta, gaps after deltas that went by unheard,
a reply's end from its read-model row, and one reply followed to its end with every wait
bounded and a lost end taken from the read model. No servers: a follower's queue is fed
the bytes NATS would hand it."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

import api.reply_stream as reply_stream
from api.reply_stream import ReplyFollower, ReplyTimeout, SentText, decode, end_of
from chatbot.bus.messaging import (
    ReplyDone,
    ReplyError,
    TitleWritten,
    TokenDelta,
    token_encoder,
)
from tests.fakes import FakeServices

# -- SentText -------------------------------------------------------------------------------


def test_deltas_in_order_pass_whole_and_add_up() -> None:
    sent = SentText()
    parts = [sent.unseen(TokenDelta("r", 0, "Ahoy")), sent.unseen(TokenDelta("r", 4, " there"))]
    assert parts == ["Ahoy", " there"]
    assert sent.rest("r", "Ahoy there") == ""  # streamed whole: nothing more at the end
    assert "r" not in sent.sent and "r" not in sent.gapped


def test_a_regenerated_reply_sends_only_what_the_client_lacks() -> None:
    sent = SentText()
    assert sent.unseen(TokenDelta("r", 0, "Ahoy th")) == "Ahoy th"
    # a worker died; the next one starts over from offset 0
    assert sent.unseen(TokenDelta("r", 0, "Ahoy")) == ""
    assert sent.unseen(TokenDelta("r", 4, " there")) == "ere"
    assert sent.unseen(TokenDelta("r", 10, "!")) == "!"


def test_after_a_gap_nothing_streams_and_the_rest_comes_whole_with_the_end() -> None:
    sent = SentText()
    text = "Ahoy! there, matey"
    assert sent.unseen(TokenDelta("r", 0, "Ahoy")) == "Ahoy"
    assert sent.unseen(TokenDelta("r", 6, "there,")) == ""  # "! " went by unheard
    assert sent.unseen(TokenDelta("r", 12, " matey")) == ""  # in order again, but after the gap
    assert sent.rest("r", text) == "! there, matey"
    assert sent.sent == {} and sent.gapped == set()


def test_a_client_that_heard_only_later_deltas_gets_the_whole_text_at_the_end() -> None:
    sent = SentText()
    assert sent.unseen(TokenDelta("r", 6, "there,")) == ""
    assert sent.rest("r", "Ahoy! there,") == "Ahoy! there,"


def test_replies_are_kept_apart_and_a_failed_one_is_forgotten() -> None:
    sent = SentText()
    assert sent.unseen(TokenDelta("a", 0, "one")) == "one"
    assert sent.unseen(TokenDelta("b", 3, "gap")) == ""
    assert sent.unseen(TokenDelta("a", 3, " two")) == " two"  # b's gap is b's alone
    sent.forget("b")
    assert sent.unseen(TokenDelta("b", 0, "new")) == "new"
    assert sent.sent == {"a": 7, "b": 3} and sent.gapped == set()


# -- messages and rows ------------------------------------------------------------------------


def test_a_message_that_does_not_decode_is_dropped() -> None:
    assert decode(b"{not json") is None
    assert decode(b'{"type": "nope", "reply_id": "r"}') is None
    assert decode(token_encoder.encode(TokenDelta("r", 0, "hi"))) == TokenDelta("r", 0, "hi")


def test_the_end_of_a_reply_from_its_read_model_row() -> None:
    assert end_of("r", {"status": "pending", "text": "", "finish_reason": None}) is None
    assert end_of("r", {"status": "complete", "text": "Hi", "finish_reason": "length"}) == ReplyDone("r", "Hi", "length")
    assert end_of("r", {"status": "complete", "text": "Hi", "finish_reason": None}) == ReplyDone("r", "Hi", "stop")
    assert end_of("r", {"status": "failed", "text": "", "finish_reason": "error"}) == ReplyError("r", "the reply failed")


# -- one reply followed to its end ------------------------------------------------------------


def follower() -> tuple[ReplyFollower, FakeServices, uuid.UUID]:
    services = FakeServices()
    return ReplyFollower(services, uuid.uuid4()), services, uuid.uuid4()  # type: ignore[arg-type]


def feed(f: ReplyFollower, *messages: Any) -> None:
    for message in messages:
        f.queue.put_nowait(message if isinstance(message, bytes) else token_encoder.encode(message))


async def events(f: ReplyFollower, reply_id: uuid.UUID) -> list[Any]:
    return [e async for e in f.events(reply_id)]


async def test_a_follower_yields_its_replys_new_text_then_its_end() -> None:
    f, services, reply_id = follower()
    rid = str(reply_id)
    feed(f, TokenDelta("another reply", 0, "not this"), b"garbage", TokenDelta(rid, 0, "Ahoy"),
         TokenDelta(rid, 0, "Ahoy"), TokenDelta(rid, 4, " there"), TitleWritten(rid, "A title"),
         ReplyDone(rid, "Ahoy there", "stop"))
    assert await events(f, reply_id) == ["Ahoy", " there", ReplyDone(rid, "Ahoy there", "stop")]
    assert f.awaited == {}
    await f.close()
    assert services.quiet_replies is not None and not services.quiet_replies.sessions


async def test_a_follower_that_missed_deltas_still_yields_text_that_adds_up() -> None:
    f, _, reply_id = follower()
    rid = str(reply_id)
    feed(f, TokenDelta(rid, 0, "Ahoy"), TokenDelta(rid, 6, "there"), ReplyDone(rid, "Ahoy! there", "stop"))
    got = await events(f, reply_id)
    assert got == ["Ahoy", "! there", ReplyDone(rid, "Ahoy! there", "stop")]


async def test_a_failed_reply_ends_with_its_error() -> None:
    f, _, reply_id = follower()
    rid = str(reply_id)
    feed(f, TokenDelta(rid, 0, "Ah"), ReplyError(rid, "boom"))
    assert await events(f, reply_id) == ["Ah", ReplyError(rid, "boom")]


async def test_a_follower_that_hears_nothing_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reply_stream, "REPLY_IDLE_TIMEOUT_S", 0.05)
    f, _, reply_id = follower()
    with pytest.raises(ReplyTimeout) as raised:
        await events(f, reply_id)
    assert raised.value.waited_s == 0.05
    await f.close()


async def test_a_reply_whose_end_was_lost_ends_from_the_read_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reply_stream, "QUIET_S", 0.05)
    f, services, reply_id = follower()
    rid = str(reply_id)
    services.readmodels.rows[reply_id] = {"status": "pending", "text": "", "finish_reason": None}
    feed(f, TokenDelta(rid, 0, "Ahoy"))
    got: list[Any] = []

    async def follow() -> None:
        async for event in f.events(reply_id):
            got.append(event)

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.2)
    assert got == ["Ahoy"] and services.readmodels.lookups > 0  # still being written: it waits
    services.readmodels.rows[reply_id] = {"status": "complete", "text": "Ahoy there", "finish_reason": "stop"}
    await asyncio.wait_for(task, 1)
    assert got == ["Ahoy", " there", ReplyDone(rid, "Ahoy there", "stop")]
    await f.close()
    await asyncio.sleep(0.1)
    sweep = services.quiet_replies
    assert sweep is not None and sweep.task is not None and sweep.task.done()


async def test_a_read_model_end_that_comes_after_the_end_is_ignored() -> None:
    f, _, reply_id = follower()
    rid = str(reply_id)
    feed(f, ReplyDone(rid, "Hi", "stop"))
    assert await events(f, reply_id) == ["Hi", ReplyDone(rid, "Hi", "stop")]
    f.end_unheard(rid, {"status": "complete", "text": "Hi", "finish_reason": "stop"})
    assert f.queue.empty()

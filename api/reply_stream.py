"""Following a reply's token stream: the one place where the API turns a conversation's
token messages (chatbot/bus/messaging.py) into a reply's text and its end, for both of its
consumers: the websocket (api/token_relay.py, api/chat_socket.py: `token`/`reply` frames)
and `/v1/chat/completions` (api/openai_compat.py: a `chat.completion`, or SSE chunks).
They only format what this module hands them.

Workers publish `TokenDelta`, `ReplyDone`, `ReplyError` and `TitleWritten` on the core
subject `chat.tok.<conversation>`; `subscribe_tokens` subscribes to it before the message
is posted, so no token can arrive unheard. `decode` reads a message (an undecodable one is
dropped). `SentText` keeps what a client has of each reply: deltas carry their character
offset, a reply regenerated after a worker crash repeats text already sent and only the
unseen part goes on, and a delta past what the client has (deltas that went by unheard,
lost with a NATS node or published before a resumed client followed) stops the stream:
the client's text stays a prefix of the reply, and what it lacks goes out whole with the
end (`SentText.rest`), so the texts sent always add up to the reply.

Core NATS delivers at most once, a reply's end included. Whoever waits for ends (a socket,
a `/v1` request) keeps them in `awaited` (reply id -> conversation, when last heard of);
the process's `QuietReplies` looks a reply quiet for `QUIET_S` up in the read model, all
of them in one query a round, and if it has ended there the waiter gets its end from
there (`end_unheard`, the message made by `end_of`). A resumed client asks the worker
writing the reply for its text so far (`text_so_far`, bounded by `PROGRESS_TIMEOUT_S`).

`ReplyFollower` follows one reply of one conversation (what `/v1` needs): it yields the
reply's new text, then its `ReplyDone` or `ReplyError`; every wait is bounded by
`REPLY_IDLE_TIMEOUT_S` (`ReplyTimeout`), and a lost end comes from the read model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol
from uuid import UUID

import anyio
import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from api.services import Services
from chatbot.bus.messaging import (
    ReplyDone,
    ReplyError,
    TitleWritten,
    TokenDelta,
    TokenMessage,
    progress_subject,
    token_decoder,
    token_encoder,
    token_subject,
    unseen_text,
)

log = logging.getLogger("api.stream")
QUIET_S = 5.0  # a reply waited for and unheard of this long is looked up in the read model
LOOKUP_CHUNK = 1_000  # quiet replies looked up in one query
PROGRESS_TIMEOUT_S = 1.0  # how long a resume waits for the worker's text so far
REPLY_IDLE_TIMEOUT_S = 300.0  # a follower that hears nothing for this long gives the reply up

# -- the pure logic ------------------------------------------------------------------------


def decode(data: bytes) -> TokenMessage | None:
    """A token message, or None (dropped with a warning) when it does not decode."""
    try:
        return token_decoder.decode(data)
    except msgspec.DecodeError:
        log.warning("dropping an undecodable token message")
        return None


class SentText:
    """What a client has been sent of each reply it follows: the text of a delta it lacks,
    and at the end, whatever of the reply it never got."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}  # reply id -> characters the client has
        self.gapped: set[str] = set()  # replies whose deltas wait for their end (some went by unheard)

    def unseen(self, delta: TokenDelta) -> str:
        """The part of `delta` the client lacks: "" for a regenerated prefix it has, and
        for every delta once one came past what it has (a gap: the rest goes with the end)."""
        seen = self.sent.get(delta.reply_id, 0)
        if delta.offset > seen or delta.reply_id in self.gapped:
            self.gapped.add(delta.reply_id)
            return ""
        text, self.sent[delta.reply_id] = unseen_text(delta, seen)
        return text

    def rest(self, reply_id: str, text: str) -> str:
        """The reply ended with `text`: what of it the client lacks (the reply is forgotten)."""
        self.gapped.discard(reply_id)
        rest = self.unseen(TokenDelta(reply_id, 0, text))
        self.forget(reply_id)
        return rest

    def forget(self, reply_id: str) -> None:
        self.gapped.discard(reply_id)
        self.sent.pop(reply_id, None)


def end_of(reply_id: str, row: Any) -> ReplyDone | ReplyError | None:
    """The end of a reply as its read-model row tells it; None while it is pending."""
    if row["status"] == "pending":
        return None
    if row["status"] == "complete":
        return ReplyDone(reply_id, row["text"], row["finish_reason"] or "stop")
    return ReplyError(reply_id, "the reply failed")


# -- core NATS -------------------------------------------------------------------------------


async def subscribe_tokens(nc: NATS, conversation_id: UUID, on_data: Callable[[bytes], None], *,
                           flush: bool = False) -> Subscription:
    """Subscribe to the conversation's token messages, each handed to `on_data`; `flush`:
    wait until the server knows the subscription (before a post that is not ours to hold)."""
    async def on_message(msg: Msg) -> None:
        on_data(msg.data)

    subscription = await nc.subscribe(token_subject(conversation_id), cb=on_message)
    if flush:
        await nc.flush()
    return subscription


async def text_so_far(nc: NATS, reply_id: str) -> TokenDelta | None:
    """The text the worker writing the reply has so far (a delta at offset 0), or None:
    queued, or no worker is writing it now."""
    try:
        answer = await nc.request(progress_subject(reply_id), b"", timeout=PROGRESS_TIMEOUT_S)
        so_far = token_decoder.decode(answer.data)
    except Exception as e:  # noqa: BLE001 - timeout or no responders: queued, or its worker is gone
        log.info("resume of reply %s: no text so far (%s)", reply_id, type(e).__name__)
        return None
    return so_far if isinstance(so_far, TokenDelta) else None


# -- ends lost on the way: the read model ----------------------------------------------------


class AwaitsEnds(Protocol):
    """A socket or a `/v1` request waiting for the ends of replies."""

    awaited: dict[str, tuple[UUID, float]]  # reply id -> (conversation, last heard of) until its end

    def end_unheard(self, reply_id: str, row: Any) -> None: ...


class Sweep:
    """A process-wide task that looks over a set of sessions now and then, running only
    while some are watched (made on first use: `process_sweep`)."""

    def __init__(self) -> None:
        self.sessions: set[Any] = set()
        self.task: asyncio.Task[None] | None = None

    def watch(self, session: Any) -> None:
        self.sessions.add(session)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self.run())

    def forget(self, session: Any) -> None:
        self.sessions.discard(session)

    async def run(self) -> None:
        raise NotImplementedError


def process_sweep(services: Services, name: str, make: Any) -> Any:
    """The process's one sweep called `name`, kept on `services` (made on first use)."""
    sweep = getattr(services, name, None)
    if sweep is None:
        sweep = make()
        setattr(services, name, sweep)
    return sweep


class QuietReplies(Sweep):
    """Every reply the sockets and `/v1` requests of this API process wait for and have
    heard nothing of for `quiet_s` is looked up in the read model (its end may have been
    lost on a NATS node that died), all of them in one query a round (up to `LOOKUP_CHUNK`
    ids each), instead of one query per reply and waiter: when workers stall, 100,000
    waiting sockets must not become 40,000 queries a second."""

    def __init__(self, services: Services, quiet_s: float) -> None:
        super().__init__()
        self.services, self.quiet_s = services, quiet_s

    async def run(self) -> None:
        while self.sessions:
            await asyncio.sleep(self.quiet_s / 2)
            now = asyncio.get_running_loop().time()
            due: dict[str, list[AwaitsEnds]] = {}
            for session in list(self.sessions):
                if not session.awaited:
                    self.sessions.discard(session)  # nothing left to wait for
                    continue
                for reply_id, (conversation_id, heard) in list(session.awaited.items()):
                    if now - heard >= self.quiet_s:
                        session.awaited[reply_id] = (conversation_id, now)  # quiet from now on
                        due.setdefault(reply_id, []).append(session)
            ids = list(due)
            for start in range(0, len(ids), LOOKUP_CHUNK):
                chunk = [UUID(r) for r in ids[start:start + LOOKUP_CHUNK]]
                try:
                    rows = await self.services.call(self.services.readmodels.messages_by_id, chunk)
                except Exception:  # noqa: BLE001 - the database is away: ask again next round
                    log.warning("looking up %d quiet replies", len(chunk), exc_info=True)
                    continue
                for row in rows:
                    if row["status"] == "pending":
                        continue  # being written, or queued
                    for session in due.get(str(row["id"]), ()):
                        session.end_unheard(str(row["id"]), row)


def quiet_replies(services: Services) -> QuietReplies:
    """The process's `QuietReplies`, one for its sockets and its `/v1` requests alike."""
    return process_sweep(services, "quiet_replies", lambda: QuietReplies(services, QUIET_S))  # type: ignore[no-any-return]


# -- one reply, followed to its end -----------------------------------------------------------


class ReplyTimeout(Exception):
    """Nothing was heard of the reply for `waited_s`."""

    def __init__(self, waited_s: float) -> None:
        super().__init__(f"nothing heard of the reply for {waited_s:.0f} s")
        self.waited_s = waited_s


class ReplyFollower:
    """The token messages of one conversation, subscribed (`open`) before its message is
    posted so none is missed. `events` yields a reply's new text, then its `ReplyDone` or
    `ReplyError`; `close` unsubscribes (also when the caller went away mid-stream)."""

    def __init__(self, services: Services, conversation_id: UUID) -> None:
        self.services, self.conversation_id = services, conversation_id
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.subscription: Subscription | None = None
        self.awaited: dict[str, tuple[UUID, float]] = {}  # the reply followed, until its end

    async def open(self) -> None:
        self.subscription = await subscribe_tokens(
            self.services.nc, self.conversation_id, self.queue.put_nowait, flush=True  # the server knows it before we post
        )

    async def close(self) -> None:
        self.awaited.clear()
        quiet_replies(self.services).forget(self)
        if self.subscription is not None:
            with anyio.CancelScope(shield=True):  # also when the client went away mid-stream
                await self.subscription.unsubscribe()
            self.subscription = None

    def end_unheard(self, reply_id: str, row: Any) -> None:
        """The read model says the reply ended and its end was never heard: it comes from there."""
        end = end_of(reply_id, row)
        if reply_id in self.awaited and end is not None:
            log.info("reply %s ended unheard: its end comes from the read model", reply_id)
            self.queue.put_nowait(token_encoder.encode(end))

    async def events(self, reply_id: UUID) -> AsyncIterator[str | ReplyDone | ReplyError]:
        """The reply's text as it comes (what a regenerated delta repeats left out; after a
        gap, the rest comes with the end), then its end. `ReplyTimeout` when nothing comes
        for `REPLY_IDLE_TIMEOUT_S`."""
        rid = str(reply_id)
        text = SentText()
        loop = asyncio.get_running_loop()
        self.awaited[rid] = (self.conversation_id, loop.time())
        quiet_replies(self.services).watch(self)
        try:
            while True:
                try:
                    data = await asyncio.wait_for(self.queue.get(), REPLY_IDLE_TIMEOUT_S)
                except TimeoutError:
                    raise ReplyTimeout(REPLY_IDLE_TIMEOUT_S) from None
                message = decode(data)
                if message is None or message.reply_id != rid or isinstance(message, TitleWritten):
                    continue
                if isinstance(message, TokenDelta):
                    if rid in self.awaited:
                        self.awaited[rid] = (self.conversation_id, loop.time())
                    if part := text.unseen(message):
                        yield part
                    continue
                self.awaited.pop(rid, None)
                if isinstance(message, ReplyDone) and (rest := text.rest(rid, message.text)):
                    yield rest
                yield message
                return
        finally:
            self.awaited.pop(rid, None)

"""The chat socket's token relay (api/chat_socket.py): the token messages of the
conversations a socket follows, turned into the client's frames. Following a reply (the
subscription, decoding, offsets and gaps, the text so far, an end lost on the way) is
api/reply_stream.py's, shared with `/v1`; this module keeps a socket's own bookkeeping
(many conversations and replies at once, held tokens, resumes, ends sent once) and the frames.

Before a message is posted the session subscribes to the conversation's token subject
(`follow`), so no token can arrive before the subscription exists; until the user's
ownership of the conversation is confirmed, its tokens are held (`confirm`), so another
user's tokens never reach the socket. Token deltas carry their character offset: a reply
regenerated after a worker crash repeats text already sent, and the relay forwards only
what the client has not seen (`SentText`). Deltas of a conversation being resumed wait for
the worker's text so far (`text_so_far`), then go through the same offset filter.

Core NATS delivers at most once: a reply whose deltas went by unheard stops streaming, and
what the client lacks goes out as one last delta before the `reply` frame: the `token`
texts always add up to the reply. A reply's end goes out once (`end`); whatever of it comes
later (a re-announced end, a late duplicate delta) is dropped, and an end lost on the way
is sent from the read model (`end_unheard`, called by the process's `QuietReplies`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from uuid import UUID

from nats.aio.subscription import Subscription

from api.reply_stream import SentText, decode, end_of, subscribe_tokens, text_so_far
from api.services import Services
from chatbot.bus.messaging import (
    ReplyDone,
    ReplyError,
    TitleWritten,
    TokenDelta,
    token_encoder,
)
from chatbot.runtime.metrics import ReplyClock

log = logging.getLogger("api.ws")
MAX_SUBSCRIPTIONS = 32  # conversations one socket follows at once
MAX_HELD = 10_000  # token messages held for a conversation while its ownership is checked
ENDED_KEPT = 256  # ended replies a socket remembers, to drop what comes of them later


class TokenRelay:
    """The token messages of the conversations a socket follows, turned into `token`,
    `reply`, `title` and `error` frames in its `outbox`."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()  # frames for the writer
        self.subscriptions: dict[UUID, Subscription] = {}
        self.sent = SentText()  # what the client has of each reply (offsets, gaps)
        self.resuming: dict[str, list[TokenDelta]] = {}  # reply id -> deltas held until the text so far
        self.holding: set[UUID] = set()  # conversations being resumed: their deltas are held
        self.unconfirmed: dict[UUID, list[bytes]] = {}  # followed, ownership not checked yet: tokens held
        self.following = asyncio.Lock()  # subscribing and unsubscribing, one at a time
        self.awaited: dict[str, tuple[UUID, float]] = {}  # reply id -> (conversation, last heard of) until its end
        self.ended: dict[str, None] = {}  # replies whose end went out (the newest ENDED_KEPT): later messages dropped
        self.clocks: dict[str, ReplyClock] = {}  # replies asked for here -> their token timings (chatbot/runtime/metrics.py)

    def error(self, code: str, message: str, **extra: Any) -> None:
        self.outbox.put_nowait({"type": "error", "code": code, "message": message, **extra})

    async def text_so_far(self, reply_id: str) -> TokenDelta | None:
        return await text_so_far(self.services.nc, reply_id)

    async def follow(self, conversation_id: UUID, *, confirmed: bool = True) -> bool:
        """Subscribe to the conversation's tokens; False if this socket follows it already.
        Not `confirmed`: its tokens are held until `confirm` (the user's ownership of the
        conversation is not known yet)."""
        async with self.following:  # two lanes never subscribe to one conversation twice
            if conversation_id in self.subscriptions:
                return False
            if len(self.subscriptions) >= MAX_SUBSCRIPTIONS:
                oldest = next(iter(self.subscriptions))
                await self._unfollow(oldest)
            if not confirmed:
                self.unconfirmed[conversation_id] = []
            try:
                self.subscriptions[conversation_id] = await subscribe_tokens(
                    self.services.nc, conversation_id, lambda data: self.on_token_message(conversation_id, data)
                )
            except BaseException:
                self.unconfirmed.pop(conversation_id, None)  # nothing will confirm it
                raise
            return True

    async def unfollow(self, conversation_id: UUID) -> None:
        async with self.following:
            await self._unfollow(conversation_id)

    async def _unfollow(self, conversation_id: UUID) -> None:
        self.unconfirmed.pop(conversation_id, None)  # held tokens of a conversation not theirs: dropped
        sub = self.subscriptions.pop(conversation_id, None)
        if sub is not None:
            await sub.unsubscribe()

    def confirm(self, conversation_id: UUID) -> None:
        """The user owns the conversation: pass on the tokens held meanwhile, in order."""
        for data in self.unconfirmed.pop(conversation_id, ()):
            if data:  # b"": the mark of an overflow
                self.on_token_message(conversation_id, data)

    def on_token_message(self, conversation_id: UUID, data: bytes) -> None:
        held = self.unconfirmed.get(conversation_id)
        if held is not None:
            if len(held) < MAX_HELD:
                held.append(data)
            elif len(held) == MAX_HELD:
                held.append(b"")  # counted once: later ones are dropped without a word
                log.warning("conversation %s: over %d token messages held; dropping", conversation_id, MAX_HELD)
            return
        message = decode(data)
        if message is None:
            return
        cid = str(conversation_id)
        if isinstance(message, TitleWritten):  # after the reply ended: passed on as it is
            self.outbox.put_nowait({"type": "title", "conversation_id": cid, "title": message.title})
            return
        if message.reply_id in self.ended:
            self.awaited.pop(message.reply_id, None)
            return  # its end went out already (a re-announced end, a late duplicate delta)
        if message.reply_id in self.awaited:
            self.awaited[message.reply_id] = (conversation_id, asyncio.get_running_loop().time())
        if not isinstance(message, TokenDelta):
            self.awaited.pop(message.reply_id, None)
        if isinstance(message, TokenDelta):
            held = self.resuming.get(message.reply_id)
            if held is None and conversation_id in self.holding:
                held = self.resuming.setdefault(message.reply_id, [])
            if held is not None:
                held.append(message)  # after the text so far
            else:
                self.forward_delta(cid, message)
        elif isinstance(message, ReplyDone):
            self.resuming.pop(message.reply_id, None)
            # Tokens add up to the reply: whatever of its text this socket has not sent
            # (deltas that went by unheard, see `SentText`) goes out as one last delta.
            self.send_text(cid, message.reply_id, self.sent.rest(message.reply_id, message.text))
            self.end(message.reply_id)
            self.outbox.put_nowait({
                "type": "reply", "conversation_id": cid, "reply_id": message.reply_id,
                "text": message.text, "finish_reason": message.finish_reason,
            })
        elif isinstance(message, ReplyError):
            self.resuming.pop(message.reply_id, None)
            self.sent.forget(message.reply_id)
            self.end(message.reply_id)
            self.error("reply_failed", message.message, conversation_id=cid, reply_id=message.reply_id)
            # a terminal frame too, so a client waiting for the reply always stops waiting
            self.outbox.put_nowait({
                "type": "reply", "conversation_id": cid, "reply_id": message.reply_id,
                "text": "", "finish_reason": "error",
            })

    def end_unheard(self, reply_id: str, row: Any) -> None:
        """The read model says the reply ended, and this socket never heard its end (it was
        lost on a NATS node that died): send it from there (`on_token_message` sends an
        end once)."""
        waiting = self.awaited.get(reply_id)
        end = end_of(reply_id, row)
        if waiting is None or end is None:
            return  # its end came meanwhile (or it has none yet)
        log.info("reply %s ended unheard: its end is sent from the read model", reply_id)
        self.on_token_message(waiting[0], token_encoder.encode(end))

    def end(self, reply_id: str) -> None:
        """The reply's end went out: anything more of it is dropped."""
        clock = self.clocks.pop(reply_id, None)
        if clock is not None:
            clock.done()
        self.ended[reply_id] = None
        if len(self.ended) > ENDED_KEPT:
            del self.ended[next(iter(self.ended))]

    def forward_delta(self, cid: str, delta: TokenDelta) -> None:
        """What of the delta the client lacks (none after a gap: the rest goes with the end)."""
        self.send_text(cid, delta.reply_id, self.sent.unseen(delta))

    def send_text(self, cid: str, reply_id: str, text: str) -> None:
        if text:  # else a regenerated prefix the client already has, or a gap
            if (clock := self.clocks.get(reply_id)) is not None:
                clock.token(time.monotonic())
            self.outbox.put_nowait({"type": "token", "conversation_id": cid, "reply_id": reply_id, "text": text})

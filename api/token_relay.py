"""The chat socket's token relay (api/chat_socket.py): the token messages of the
conversations a socket follows, from core NATS to the client's frames.

Before a message is posted the session subscribes to the conversation's token subject
(`follow`), so no token can arrive before the subscription exists; until the user's
ownership of the conversation is confirmed, its tokens are held (`confirm`), so another
user's tokens never reach the socket. Token deltas carry their character offset: a reply
regenerated after a worker crash repeats text already sent, and the relay forwards only
what the client has not seen. Deltas of a conversation being resumed wait for the worker's
text so far (`text_so_far`), then go through the same offset filter.

Core NATS delivers at most once: a reply whose deltas went by unheard stops streaming, and
what the client lacks goes out as one last delta before the `reply` frame: the `token`
texts always add up to the reply. A reply's end goes out once (`end`); whatever of it comes
later (a re-announced end, a late duplicate delta) is dropped, and an end lost on the way
is sent from the read model (`end_unheard`, called by the chat socket's `QuietReplies`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from uuid import UUID

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from api.services import Services
from chatbot.bus.messaging import (
    ReplyDone,
    ReplyError,
    TitleWritten,
    TokenDelta,
    progress_subject,
    token_decoder,
    token_encoder,
    token_subject,
    unseen_text,
)
from chatbot.runtime.metrics import ReplyClock

log = logging.getLogger("api.ws")
MAX_SUBSCRIPTIONS = 32  # conversations one socket follows at once
MAX_HELD = 10_000  # token messages held for a conversation while its ownership is checked
PROGRESS_TIMEOUT_S = 1.0  # how long a resume waits for the worker's text so far
ENDED_KEPT = 256  # ended replies a socket remembers, to drop what comes of them later


class TokenRelay:
    """The token messages of the conversations a socket follows, turned into `token`,
    `reply`, `title` and `error` frames in its `outbox`."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()  # frames for the writer
        self.subscriptions: dict[UUID, Subscription] = {}
        self.delivered: dict[str, int] = {}  # reply id -> characters the client has
        self.gapped: set[str] = set()  # replies whose deltas wait for their end (some went by unheard)
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
        try:
            answer = await self.services.nc.request(progress_subject(reply_id), b"", timeout=PROGRESS_TIMEOUT_S)
            so_far = token_decoder.decode(answer.data)
        except Exception as e:  # noqa: BLE001 - timeout or no responders: queued, or its worker is gone
            log.info("resume of reply %s: no text so far (%s)", reply_id, type(e).__name__)
            return None
        return so_far if isinstance(so_far, TokenDelta) else None

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

            async def forward(msg: Msg) -> None:
                self.on_token_message(conversation_id, msg.data)

            try:
                self.subscriptions[conversation_id] = await self.services.nc.subscribe(
                    token_subject(conversation_id), cb=forward
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
        try:
            message = token_decoder.decode(data)
        except msgspec.DecodeError:
            log.warning("dropping an undecodable token message")
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
            # (deltas that went by unheard, see `forward_delta`) goes out as one last delta.
            self.gapped.discard(message.reply_id)
            self.forward_delta(cid, TokenDelta(message.reply_id, 0, message.text))
            self.delivered.pop(message.reply_id, None)
            self.end(message.reply_id)
            self.outbox.put_nowait({
                "type": "reply", "conversation_id": cid, "reply_id": message.reply_id,
                "text": message.text, "finish_reason": message.finish_reason,
            })
        elif isinstance(message, ReplyError):
            self.resuming.pop(message.reply_id, None)
            self.gapped.discard(message.reply_id)
            self.delivered.pop(message.reply_id, None)
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
        if waiting is None:
            return  # its end came meanwhile
        log.info("reply %s ended unheard: its end is sent from the read model", reply_id)
        end = (ReplyDone(reply_id, row["text"], row["finish_reason"] or "stop") if row["status"] == "complete"
               else ReplyError(reply_id, "the reply failed"))
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
        seen = self.delivered.get(delta.reply_id, 0)
        if delta.offset > seen or delta.reply_id in self.gapped:
            # Text between what the client has and this delta went by unheard (lost with a
            # NATS node, or published before a resumed socket followed): the client's text
            # stays a prefix of the reply, and the rest goes out whole with its end.
            self.gapped.add(delta.reply_id)
            return
        text, self.delivered[delta.reply_id] = unseen_text(delta, seen)
        if text:  # else a regenerated prefix the client already has
            if (clock := self.clocks.get(delta.reply_id)) is not None:
                clock.token(time.monotonic())
            self.outbox.put_nowait({"type": "token", "conversation_id": cid, "reply_id": delta.reply_id, "text": text})

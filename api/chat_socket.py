"""The websocket chat protocol.

One `ChatSession` per connection. Incoming frames are size-checked, decoded into typed
frames (msgspec tagged union) and dispatched; every problem becomes an `error` frame and
the connection stays usable. Before a message is posted the session follows the
conversation, so no token can arrive before the subscription exists; the token messages
are turned into frames by the session's token relay (api/token_relay.py: held tokens,
resumes, ends sent once), over the reply stream it shares with `/v1`
(api/reply_stream.py: offsets, gaps, the read model for lost ends). A single writer task
owns the socket's send side.

Frames are handled concurrently, in one lane per conversation (a `stop`: per reply):
frames of one conversation are handled in the order they came, each after the one before
it has been answered, while frames of other conversations go ahead. At most
`MAX_IN_FLIGHT` frames of a socket are in hand at once; beyond that the session stops
reading the socket until one is answered. Resumes are handled one at a time.

`regenerate` and `edit` frames make a sibling reply or a new branch, answered like `send`
with an `accepted` frame. A client that reconnects (a refresh, another API process) sends
`resume`: the session follows the conversation again and asks the worker writing its
pending reply for the text so far (a request on `chat.progress.<reply>`); deltas that
arrive meanwhile wait, then go through the same offset filter, so the client gets the
text so far once and then the rest, with nothing lost or doubled.

Token messages travel on core NATS, which delivers at most once: when a NATS node dies,
the messages on their way through it are lost, a reply's end among them. So a reply this
socket waits for that has been quiet for `QUIET_S` (api/reply_stream.py) is looked up in the read model, and
if it has ended there, its `reply` frame is sent from there (api/reply_stream.py's
`QuietReplies`, one query per API process a round): a client never waits for an end that
was lost on the way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable
from uuid import UUID, uuid4

import msgspec
from litestar import WebSocket, websocket
from litestar.exceptions import WebSocketDisconnect
from opentelemetry.trace import SpanKind

from api.auth import REVOKED, session_of
from api.csrf import same_origin
from api.limits import Limited
from api.ownership import owner_of
from api.reply_stream import Sweep, process_sweep, quiet_replies
from api.schemas import (
    CLIENT_FRAME_TYPES,
    ClientFrame,
    EditFrame,
    RegenerateFrame,
    ResumeFrame,
    SendFrame,
    StopFrame,
)
from api.services import Services
from api.token_relay import TokenRelay
from chatbot.bus.messaging import cancel_subject
from chatbot.runtime.metrics import (
    FRAMES,
    SEND_ACCEPTED,
    SERVER_FRAME_TYPES,
    WEBSOCKETS_OPEN,
    ReplyClock,
    bounded,
)
from chatbot.runtime.postgres import WriteTimeout
from chatbot.runtime.tracing import span
from domain.app_conversations import PostedMessage
from domain.conversation_errors import (
    ConversationError,
    ConversationNotFound,
    InvalidSampling,
    MessageNotFound,
    PersonaUnavailable,
)

log = logging.getLogger("api.ws")
frame_decoder = msgspec.json.Decoder(ClientFrame)
encoder = msgspec.json.Encoder()
MAX_IN_FLIGHT = 64  # frames of one socket being handled at once
SESSION_CHECK_S = 1.0  # how often open sockets are checked against ended sessions


class ChatSession(TokenRelay):
    """One websocket connection: its frames read, handled in lanes and answered, its replies
    relayed (`TokenRelay`)."""

    def __init__(self, socket: WebSocket[Any, Any, Any], user_id: UUID, services: Services,
                 session_id: UUID | None = None) -> None:
        super().__init__(services)
        self.socket, self.user_id = socket, user_id
        self.session_id = session_id  # the log-in it was opened with: ending that closes it
        self.replies: dict[UUID, UUID] = {}  # reply id -> conversation, for replies sent here
        self.lanes: dict[Any, asyncio.Task[None]] = {}  # conversation (or reply) -> its newest frame's task
        self.in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self.resume_lock = asyncio.Lock()  # one resume at a time: held deltas are that resume's

    async def run(self) -> None:
        writer = asyncio.create_task(self.write())
        ended_sessions(self.services).watch(self)
        try:
            while True:
                message = await self.socket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                if self.session_id in REVOKED:  # logged out (here or in another process) meanwhile
                    self.error("session_ended", "this session has ended: log in again")
                    break
                raw = message.get("text")
                if raw is None:
                    raw = message.get("bytes") or b""
                await self.on_frame(raw)
        except WebSocketDisconnect:
            pass
        finally:
            ended_sessions(self.services).forget(self)
            # what is in hand finishes (a command in a thread cannot be called back anyway)
            while self.lanes:
                await asyncio.wait(list(self.lanes.values()))
            quiet_replies(self.services).forget(self)
            for sub in self.subscriptions.values():
                await sub.unsubscribe()
            self.outbox.put_nowait(None)
            await writer

    async def close_for_ended_session(self) -> None:
        """Tell the client its session ended, then close (`EndedSessions`)."""
        self.error("session_ended", "this session has ended: log in again")
        for _ in range(20):  # let the writer send it (bounded: the client may be gone)
            if self.outbox.empty():
                break
            await asyncio.sleep(0.05)
        await self.socket.close(code=4401, reason="session ended")

    async def write(self) -> None:
        while (frame := await self.outbox.get()) is not None:
            try:
                await self.socket.send_data(encoder.encode(frame).decode(), mode="text")
            except Exception:  # noqa: BLE001 - the client went away; the reader will notice
                return
            FRAMES.labels(direction="out", type=bounded(frame["type"], SERVER_FRAME_TYPES)).inc()

    def refuse(self, code: str, message: str) -> None:
        """An incoming frame that is not one: counted as "invalid", answered with an error."""
        FRAMES.labels(direction="in", type="invalid").inc()
        self.error(code, message)

    async def on_frame(self, raw: str | bytes) -> None:
        limit = self.services.settings.max_frame_bytes
        size = len(raw.encode() if isinstance(raw, str) else raw)
        if size > limit:
            return self.refuse("frame_too_large", f"frames are at most {limit} bytes, this one has {size}")
        if isinstance(raw, bytes):  # a binary frame: it still has to be JSON text
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return self.refuse("malformed", f"a frame is UTF-8 JSON text; this one is not valid UTF-8 (byte {e.start})")
        try:
            frame = frame_decoder.decode(raw)
        except RecursionError:  # deep nesting where the "type" tag is looked for
            return self.refuse("malformed", "a frame nests too deeply")
        except msgspec.DecodeError as e:
            return self.refuse(*self.explain(raw, e))
        FRAMES.labels(direction="in", type=bounded(frame.__struct_config__.tag, CLIENT_FRAME_TYPES)).inc()
        lane: Any = ("reply", frame.reply_id) if isinstance(frame, StopFrame) else frame.conversation_id
        await self.in_flight.acquire()
        task = asyncio.create_task(self.handle(frame, self.lanes.get(lane)))
        self.lanes[lane] = task
        task.add_done_callback(lambda done: self.lanes.pop(lane) if self.lanes.get(lane) is done else None)

    async def handle(self, frame: ClientFrame, before: asyncio.Task[None] | None) -> None:
        """Handle a frame after the frame before it in its lane; an unexpected failure
        is answered with an `internal` error frame, and the connection stays usable."""
        try:
            if before is not None:
                await asyncio.wait([before])
            # a message's trace starts here (chatbot/runtime/tracing.py); the frame type is the name
            with span(f"ws {frame.__struct_config__.tag}", SpanKind.SERVER):
                await self.dispatch(frame)
        except Exception:
            log.exception("handling a %s frame", type(frame).__name__)
            ids = {k: str(v) for k in ("conversation_id", "client_message_id", "reply_id")
                   if (v := getattr(frame, k, None)) is not None}
            self.error("internal", "the frame could not be handled; try again", **ids)
        finally:
            self.in_flight.release()

    async def dispatch(self, frame: ClientFrame) -> None:
        """The frame's handler, inside its `ws <type>` span (a message's trace begins there)."""
        if isinstance(frame, SendFrame):
            await self.on_send(frame)
        elif isinstance(frame, StopFrame):
            await self.on_stop(frame)
        elif isinstance(frame, RegenerateFrame):
            await self.on_regenerate(frame)
        elif isinstance(frame, EditFrame):
            await self.on_edit(frame)
        elif isinstance(frame, ResumeFrame):
            async with self.resume_lock:
                await self.on_resume(frame)

    async def on_stop(self, frame: StopFrame) -> None:
        """Ask whichever worker generates the reply to stop; its final `reply` frame
        (finish_reason "cancelled") follows. Stopping a finished reply changes nothing."""
        row = await self.services.call(self.services.readmodels.message, frame.reply_id)
        conversation_id = self.replies.get(frame.reply_id) or (row["conversation_id"] if row else None)
        if conversation_id is None or await owner_of(self.services, conversation_id) != self.user_id:
            return self.error("not_found", "no such reply", reply_id=str(frame.reply_id))
        await self.follow(conversation_id)
        await self.services.nc.publish(cancel_subject(frame.reply_id), b"")

    @staticmethod
    def explain(raw: str | bytes, error: msgspec.DecodeError) -> tuple[str, str]:
        """Tell a malformed frame from an unknown type from a bad field."""
        try:
            value = msgspec.json.decode(raw)
        except RecursionError:  # msgspec's answer to very deep nesting, not a DecodeError
            return "malformed", "a frame nests too deeply"
        except msgspec.DecodeError:
            return "malformed", "a frame is a JSON object"
        if not isinstance(value, dict) or not isinstance(value.get("type"), str):
            return "malformed", 'a frame is a JSON object with a "type"'
        if value["type"] not in CLIENT_FRAME_TYPES:
            return "unknown_type", f"unknown frame type {value['type']!r}; known: {sorted(CLIENT_FRAME_TYPES)}"
        return "invalid", str(error)

    async def on_send(self, frame: SendFrame) -> None:
        await self.request_reply(
            frame.conversation_id, {"client_message_id": frame.client_message_id},
            self.services.app.post_message, frame.conversation_id, self.user_id, frame.client_message_id, frame.text,
        )

    async def on_regenerate(self, frame: RegenerateFrame) -> None:
        await self.request_reply(
            frame.conversation_id, {}, self.services.app.regenerate,
            frame.conversation_id, self.user_id, frame.message_id,
        )

    async def on_edit(self, frame: EditFrame) -> None:
        client_message_id = frame.client_message_id or f"edit-{uuid4()}"
        await self.request_reply(
            frame.conversation_id, {"client_message_id": client_message_id}, self.services.app.edit_message,
            frame.conversation_id, self.user_id, frame.message_id, client_message_id, frame.text,
        )

    async def request_reply(self, conversation_id: UUID, ids: dict[str, Any], command: Any, *args: Any) -> None:
        """Run a command that requests a reply (after the rate limit), following the
        conversation first so no token can arrive unheard; answer `accepted` or an error.

        The command itself checks that the user owns the conversation (in the same trip
        to a thread, instead of a read-model query first). Until it has, and until
        `accepted` is out, the conversation's tokens are held (`unconfirmed`): another
        user's tokens must never reach this socket, and a reply that streams whole while
        the command's answer is on its way still comes after its `accepted`."""
        ids = {"conversation_id": str(conversation_id), **ids}
        started = time.monotonic()
        subscribed = await self.follow(conversation_id, confirmed=False)
        self.unconfirmed.setdefault(conversation_id, [])  # followed before: held all the same
        owned = False
        try:
            posted = await self.services.call(self.limited, command, *args)  # one trip to a thread
        except ConversationNotFound:
            return self.error("not_found", "no such conversation", **ids)
        except MessageNotFound:
            owned = True  # the conversation is theirs; the message is not in it
            return self.error("not_found", "no such message in this conversation", **ids)
        except WriteTimeout:
            return self.error("busy", "the server is busy and saved nothing; try again in a few seconds", **ids)
        except PersonaUnavailable as e:
            owned = True  # checked after ownership
            return self.error("persona_unavailable", str(e), **ids)
        except ConversationError as e:
            # every command checks ownership first; only sampling is checked before that
            owned = not isinstance(e, InvalidSampling)
            return self.error("rejected", str(e), **ids)
        else:
            if isinstance(posted, Limited):  # the rate limit comes before the command
                return self.error("rate_limited", posted.message, retry_after=posted.retry_after, **ids)
            owned = True
            self.replies[posted.reply_id] = conversation_id
            self.await_end(str(posted.reply_id), conversation_id)
            if posted.created:  # a retried frame's reply is timed by the socket that asked first
                self.clocks[str(posted.reply_id)] = ReplyClock(started)
            SEND_ACCEPTED.observe(time.monotonic() - started)
            self.outbox.put_nowait({
                "type": "accepted", **ids, "message_id": str(posted.message_id),
                "reply_id": str(posted.reply_id), "duplicate": not posted.created,
            })
        finally:
            if owned or not subscribed:  # theirs, or followed (and so checked) before
                self.confirm(conversation_id)
            else:
                await self.unfollow(conversation_id)

    def limited(self, command: Callable[..., PostedMessage], *args: Any) -> PostedMessage | Limited:
        """The rate limit, then (if within it) the command; in a thread."""
        limited = self.services.limits.check_send(self.user_id)
        if limited is not None:
            return limited
        with span(f"command {command.__name__}"):  # its events carry this span's context
            return command(*args)

    async def on_resume(self, frame: ResumeFrame) -> None:
        """Follow the conversation again; for a reply being written, send its text so far
        (then the rest streams as usual). `resumed` names that reply (or null)."""
        conversation_id = frame.conversation_id
        cid = str(conversation_id)
        if await owner_of(self.services, conversation_id) != self.user_id:
            return self.error("not_found", "no such conversation", conversation_id=cid)
        self.holding.add(conversation_id)  # deltas from now on wait for the text so far
        try:
            await self.follow(conversation_id)
            reply_id = await self.services.call(self.services.app.pending_reply, conversation_id, self.user_id)
            rid = str(reply_id) if reply_id else None
            if rid in self.ended:
                rid = None  # it ended while this was asked, and its `reply` frame went out
            if rid is not None:
                self.replies[reply_id] = conversation_id
                self.resuming.setdefault(rid, [])
                self.await_end(rid, conversation_id)
            self.outbox.put_nowait({"type": "resumed", "conversation_id": cid, "reply_id": rid})
            so_far = await self.text_so_far(rid) if rid else None
        except ConversationNotFound:
            return self.error("not_found", "no such conversation", conversation_id=cid)
        finally:
            self.holding.discard(conversation_id)
        # Resumes are handled one at a time, so everything held is this resume's: the text so
        # far and what followed it, then any other reply's deltas. A reply that finished
        # meanwhile has no entry any more (its `reply` frame went out with the whole text).
        held = self.resuming.pop(rid, None) if rid else None
        if held is not None:
            for delta in ([so_far] if so_far else []) + held:
                self.forward_delta(cid, delta)
        while self.resuming:
            for delta in self.resuming.pop(next(iter(self.resuming))):
                self.forward_delta(cid, delta)

    def await_end(self, reply_id: str, conversation_id: UUID) -> None:
        """Wait for the reply's end; the process's `QuietReplies` looks it up if it is
        quiet for too long. A reply whose end this socket sent already is not waited for."""
        if reply_id in self.ended:
            return
        self.awaited[reply_id] = (conversation_id, asyncio.get_running_loop().time())
        quiet_replies(self.services).watch(self)


class EndedSessions(Sweep):
    """An ended session (logged out, ended from another device, the account erased) closes
    its open sockets within `SESSION_CHECK_S`, not only at their next frame: a socket that
    only listens would otherwise go on receiving the account's replies. One sweep a round
    over every open socket of the process (a set lookup each), not a timer per socket."""

    def watch(self, session: ChatSession) -> None:
        if session.session_id is not None:  # a socket without a log-in session has none to end
            super().watch(session)

    async def run(self) -> None:
        while self.sessions:
            await asyncio.sleep(SESSION_CHECK_S)
            for session in [s for s in self.sessions if s.session_id in REVOKED]:
                self.sessions.discard(session)
                asyncio.create_task(session.close_for_ended_session())


def ended_sessions(services: Services) -> EndedSessions:
    return process_sweep(services, "ended_sessions", EndedSessions)  # type: ignore[no-any-return]



def origin_allowed(socket: WebSocket[Any, Any, Any], allowed: tuple[str, ...]) -> bool:
    """A browser sends its page's Origin: refuse pages of other sites, which would ride on
    the user's session cookie. Clients that send no Origin (API clients) use tokens."""
    origin = socket.headers.get("origin")
    return origin is None or same_origin(origin, socket.headers.get("host", ""), allowed)


@websocket("/api/ws")
async def chat_socket(socket: WebSocket[Any, Any, Any], services: Services) -> None:
    if not origin_allowed(socket, services.settings.allowed_origins):
        await socket.close(code=4403, reason="foreign origin")
        return
    session = session_of(socket, services.settings.secret_key)
    if session is None:
        await socket.close(code=4401, reason="log in first")
        return
    await socket.accept()
    WEBSOCKETS_OPEN.inc()
    try:
        await ChatSession(socket, session.user_id, services, session.session_id).run()
    finally:
        WEBSOCKETS_OPEN.dec()

"""A socket follows a conversation before the command that checks who owns it returns (so
no token of an accepted message is missed). Until that check, the conversation's tokens
are held: an owner gets them, in order, once the command succeeds; for anyone else they
are dropped with the subscription. The session runs against fakes; no servers."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from api.chat_socket import ChatSession
from chatbot.bus.messaging import TokenDelta, token_encoder
from domain.app_conversations import PostedMessage
from domain.conversation_errors import ConversationNotFound
from tests.fakes import frames
from tests.waiting import async_eventually


class FakeSubscription:
    def __init__(self, cb: Any) -> None:
        self.cb, self.active = cb, True

    async def unsubscribe(self) -> None:
        self.active = False


class FakeNats:
    def __init__(self) -> None:
        self.subs: list[FakeSubscription] = []

    async def subscribe(self, subject: str, cb: Any) -> FakeSubscription:
        self.subs.append(FakeSubscription(cb))
        return self.subs[-1]


class GatedServices:
    """`call` waits until the test says how the command ends."""

    def __init__(self) -> None:
        self.nc = FakeNats()
        self.outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def call(self, func: Any, *args: Any) -> Any:
        result = await self.outcome
        if isinstance(result, Exception):
            raise result
        return result


class Msg:
    def __init__(self, data: bytes) -> None:
        self.data = data


async def start(session: ChatSession, services: GatedServices, conversation_id: uuid.UUID) -> asyncio.Task[None]:
    task = asyncio.create_task(session.request_reply(conversation_id, {}, object()))
    # subscribed; the command is under way
    await async_eventually(lambda: services.nc.subs, timeout=10, interval=0, what="the session's subscription")
    return task


async def deliver(services: GatedServices, reply_id: str, texts: list[str]) -> None:
    offset = 0
    for text in texts:
        await services.nc.subs[-1].cb(Msg(token_encoder.encode(TokenDelta(reply_id, offset, text))))
        offset += len(text)


async def test_an_intruders_socket_never_passes_on_the_tokens_it_heard_while_ownership_was_checked() -> None:
    services = GatedServices()
    session = ChatSession(None, uuid.uuid4(), services)  # type: ignore[arg-type]
    conversation_id = uuid.uuid4()
    task = await start(session, services, conversation_id)
    await deliver(services, str(uuid.uuid4()), ["someone ", "else's ", "reply"])
    assert frames(session) == []
    services.outcome.set_result(ConversationNotFound(str(conversation_id)))
    await task
    assert [f["type"] for f in frames(session)] == ["error"]
    assert not services.nc.subs[-1].active and conversation_id not in session.subscriptions
    assert session.unconfirmed == {}


async def test_the_owner_gets_the_tokens_held_meanwhile_in_order() -> None:
    services = GatedServices()
    session = ChatSession(None, uuid.uuid4(), services)  # type: ignore[arg-type]
    conversation_id, message_id, reply_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    task = await start(session, services, conversation_id)
    await deliver(services, str(reply_id), ["Ahoy", " there"])
    assert frames(session) == []
    services.outcome.set_result(PostedMessage(conversation_id, message_id, reply_id, True))
    await task
    await deliver(services, str(reply_id), ["Ahoy there", "!"])  # later tokens go straight through
    sent = frames(session)
    text = "".join(f["text"] for f in sent if f["type"] == "token")
    assert text == "Ahoy there!" and sent[0]["type"] == "accepted"  # `accepted` first, then its tokens
    assert services.nc.subs[-1].active and session.unconfirmed == {}


async def test_a_reply_that_streams_whole_before_the_command_returns_still_comes_after_accepted() -> None:
    """On a conversation the socket follows already (checked before), a short reply can be
    written while the command's answer is on its way back from its thread: its tokens and
    its end wait for `accepted`, and the socket does not wait for that reply's end again."""
    from chatbot.bus.messaging import ReplyDone

    services = GatedServices()
    session = ChatSession(None, uuid.uuid4(), services)  # type: ignore[arg-type]
    conversation_id, message_id, reply_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await session.follow(conversation_id)  # followed before (a resume, or an earlier send)
    task = asyncio.create_task(session.request_reply(conversation_id, {}, object()))
    await asyncio.sleep(0)
    await deliver(services, str(reply_id), ["Ahoy", " there"])
    await services.nc.subs[-1].cb(Msg(token_encoder.encode(ReplyDone(str(reply_id), "Ahoy there", "stop"))))
    assert frames(session) == []
    services.outcome.set_result(PostedMessage(conversation_id, message_id, reply_id, True))
    await task
    assert [f["type"] for f in frames(session)] == ["accepted", "token", "token", "reply"]
    assert str(reply_id) not in session.awaited  # its end came: nothing to look up later


async def test_a_subscription_that_fails_leaves_nothing_held() -> None:
    class BrokenNats(FakeNats):
        async def subscribe(self, subject: str, cb: Any) -> FakeSubscription:
            raise ConnectionError("NATS is draining")

    services = GatedServices()
    services.nc = BrokenNats()
    session = ChatSession(None, uuid.uuid4(), services)  # type: ignore[arg-type]
    conversation_id = uuid.uuid4()
    try:
        await session.request_reply(conversation_id, {}, object())
    except ConnectionError:
        pass
    else:
        raise AssertionError("the failed subscription is an error of the frame")
    assert session.unconfirmed == {} and conversation_id not in session.subscriptions

"""The OpenAI-compatible API, end to end with the official `openai` client: a key made over
REST, then models and chat completions (plain and streamed) through the whole pipeline
(API -> event store -> relay -> JetStream -> worker -> Triton -> tokens -> API), each
recorded as a conversation of the key's user."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from uuid import UUID

import httpx
import openai
import pytest

from domain.conversation import Conversation
from domain.user import parse_api_key
from tests.client import ChatClient
from tests.waiting import async_eventually

pytestmark = pytest.mark.integration


async def create_key(client: ChatClient, name: str = "tests") -> dict[str, str]:
    r = await client.http.post("/api/keys", json={"name": name}, headers=client.headers)
    assert r.status_code == 201, r.text
    return dict(r.json())


@pytest.fixture
async def key(client: ChatClient) -> str:
    return (await create_key(client))["key"]


@pytest.fixture
async def ai(api_url: str, key: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=api_url + "/v1", api_key=key, max_retries=0, timeout=180) as ai:
        yield ai


def reply_id_of(completion_id: str) -> UUID:
    assert completion_id.startswith("chatcmpl-"), completion_id
    return UUID(hex=completion_id.removeprefix("chatcmpl-"))


async def test_a_key_made_over_rest_lists_the_personas_as_models(client: ChatClient, ai: openai.AsyncOpenAI) -> None:
    models = await ai.models.list()
    slugs = {m.id for m in models.data}
    assert {"assistant", "pirate", "tutor"} <= slugs
    assert all(m.object == "model" and m.owned_by == "chatbot" and m.created > 0 for m in models.data)
    assert (await ai.models.retrieve("pirate")).id == "pirate"
    listed = (await client.get("/api/keys")).json()
    assert [(k["name"], k["revoked"]) for k in listed] == [("tests", False)]


async def test_a_completion_returns_the_reply_and_its_usage_and_is_recorded_as_events(
    client: ChatClient, ai: openai.AsyncOpenAI, key: str, chat_app
) -> None:
    raw = await ai.chat.completions.with_raw_response.create(
        model="pirate",
        messages=[
            {"role": "system", "content": "Keep it short."},
            {"role": "user", "content": "Hello there!"},
            {"role": "assistant", "content": "Ahoy, matey!"},
            {"role": "user", "content": "How are you today?"},
        ],
        max_tokens=24, temperature=0.7,
    )
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.model == "pirate"
    [choice] = completion.choices
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in {"stop", "length"}
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    # Recorded like any chat: a conversation of the key's user (listed apart, as the key's
    # chats are by default), the earlier turns imported, the question posted, its reply
    # requested with the request's parameters, then completed.
    conversation_id = UUID(raw.headers["x-chat-conversation-id"])
    reply_id = reply_id_of(completion.id)
    conversation: Conversation = chat_app.repository.get(conversation_id)
    assert str(conversation.owner_id) == client.user_id
    events = list(chat_app.events.get(conversation_id))[:7]  # (the model's title may follow)
    assert [type(e).__name__ for e in events] == [
        "Started", "ListedApart", "TurnsImported", "UserMessagePosted", "ReplyRequested", "ReplyCompleted", "Titled",
    ]
    listed, imported, posted, requested, completed, titled = events[1:]
    assert listed.key_id == parse_api_key(key)[0]
    assert [t["text"] for t in imported.turns] == ["Hello there!", "Ahoy, matey!"]
    assert imported.instructions == "Keep it short."
    assert posted.text == "How are you today?"
    assert requested.reply_id == reply_id and requested.params["max_tokens"] == 24
    assert requested.params["temperature"] == 0.7
    assert completed.text == choice.message.content
    assert titled.title == "How are you today?"
    assert (completed.prompt_tokens, completed.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    # and the read models show the whole exchange, imported turns first, titled by the message
    messages = await client.messages_when(
        str(conversation_id), lambda ms: len(ms) == 4 and ms[3]["status"] == "complete"
    )
    assert [(m["role"], m["text"]) for m in messages] == [
        ("user", "Hello there!"), ("assistant", "Ahoy, matey!"),
        ("user", "How are you today?"), ("assistant", completed.text),
    ]
    titles = await client.titles_when_shown(chat_app, str(conversation_id))  # the title follows the reply
    assert titles[0] == "How are you today?"
    listed = {c["id"]: c for c in (await client.get("/api/conversations")).json()}
    assert listed[str(conversation_id)]["message_count"] == 4


async def test_a_streamed_completion_arrives_in_chunks_that_add_up_to_the_recorded_reply(
    ai: openai.AsyncOpenAI, chat_app
) -> None:
    raw = await ai.chat.completions.with_raw_response.create(
        model="tutor", messages=[{"role": "user", "content": "What is your favorite subject?"}],
        stream=True, stream_options={"include_usage": True}, max_tokens=32,
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    chunks = [chunk async for chunk in raw.parse()]

    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text.strip()
    assert [c.choices[0].finish_reason for c in content_chunks[:-1]] == [None] * (len(content_chunks) - 1)
    assert content_chunks[-1].choices[0].finish_reason in {"stop", "length"}
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None and 0 < usage.completion_tokens <= 32

    conversation: Conversation = chat_app.repository.get(UUID(raw.headers["x-chat-conversation-id"]))
    reply = conversation.reply(reply_id_of(chunks[0].id))
    assert reply["status"] == "complete" and reply["text"] == text
    assert reply["completion_tokens"] == usage.completion_tokens


async def test_completions_run_side_by_side(ai: openai.AsyncOpenAI) -> None:
    async def ask(question: str) -> str:
        completion = await ai.chat.completions.create(
            model="assistant", messages=[{"role": "user", "content": question}], max_tokens=16,
        )
        return completion.choices[0].message.content or ""

    answers = await asyncio.gather(*(ask(f"Tell me about number {i}.") for i in range(4)))
    assert all(a.strip() for a in answers)


async def test_an_invalid_or_revoked_key_is_refused_with_401(client: ChatClient, api_url: str) -> None:
    made = await create_key(client, "soon revoked")
    base_url = api_url + "/v1"
    for bad in ("sk-chat-nonsense", made["key"][:-2] + "xx", "not-even-close"):
        async with openai.AsyncOpenAI(base_url=base_url, api_key=bad, max_retries=0) as ai:
            with pytest.raises(openai.AuthenticationError) as refused:
                await ai.models.list()
        assert refused.value.status_code == 401
        assert refused.value.code == "invalid_api_key"
    async with openai.AsyncOpenAI(base_url=base_url, api_key=made["key"], max_retries=0) as ai:
        await ai.models.list()  # works until revoked
        r = await client.http.delete(f"/api/keys/{made['key_id']}", headers=client.headers)
        assert r.status_code == 204
        with pytest.raises(openai.AuthenticationError):
            await ai.chat.completions.create(model="pirate", messages=[{"role": "user", "content": "hi"}])
    async with httpx.AsyncClient(base_url=api_url) as http:
        r = await http.get("/v1/models")  # no key at all
        assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
        # keys are managed with a session only, and only one's own
        assert (await http.post("/api/keys", json={"name": "x"})).status_code == 401
        r = await http.post("/api/keys", json={"name": "x"}, headers={"Authorization": f"Bearer {made['key']}"})
        assert r.status_code == 401  # an API key is not a session
    r = await client.http.delete("/api/keys/0123456789abcdef", headers=client.headers)
    assert r.status_code == 404


async def test_an_unknown_model_is_refused_with_404(ai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as refused:
        await ai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.code == "model_not_found"
    assert "gpt-4o" in refused.value.message
    with pytest.raises(openai.NotFoundError):
        await ai.models.retrieve("gpt-4o")


async def test_malformed_requests_are_refused_with_400_in_openais_shape(ai: openai.AsyncOpenAI) -> None:
    bad_requests = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": []},
        {"messages": [{"role": "user", "content": "hi"}], "n": 2},
        {"messages": [{"role": "user", "content": "hi"}], "temperature": 5},
        {"messages": [{"role": "user", "content": "   "}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {"messages": "not a list"},
    ]
    for body in bad_requests:
        with pytest.raises(openai.BadRequestError) as refused:
            await ai.chat.completions.create(model="pirate", **body)  # type: ignore[call-overload]
        assert refused.value.status_code == 400, body
        assert refused.value.body["type"] == "invalid_request_error", body  # type: ignore[index]


async def test_a_prompt_too_long_for_the_model_is_a_400_not_a_hang(ai: openai.AsyncOpenAI) -> None:
    words = " ".join(f"word{i}" for i in range(850))  # under the character limit, over 2,048 tokens
    with pytest.raises(openai.BadRequestError) as refused:
        await ai.chat.completions.create(model="pirate", messages=[{"role": "user", "content": words}])
    assert "too long for the model" in refused.value.message and "context of 2,048" in refused.value.message


async def test_completions_share_the_users_message_rate_limit_and_get_429(ai: openai.AsyncOpenAI) -> None:
    # The test stack allows 6 messages a minute; 13 in a row exceed that even if they
    # straddle two one-minute windows. (One after the other: a burst would grow the API's
    # connection pools, and the test stack's PostgreSQL has few connections to spare.)
    for attempt in range(13):
        try:
            await ai.chat.completions.create(
                model="assistant", messages=[{"role": "user", "content": "Hi!"}], max_tokens=1,
            )
        except openai.RateLimitError as e:
            assert e.code == "rate_limit_exceeded" and e.body["type"] == "rate_limit_error"  # type: ignore[index]
            assert int(e.response.headers["retry-after"]) > 0
            break
    else:
        raise AssertionError("13 completions in a row were never rate-limited")
    assert attempt >= 1  # the first ones went through


async def test_a_client_that_leaves_a_stream_early_stops_the_generation(ai: openai.AsyncOpenAI, chat_app) -> None:
    raw = await ai.chat.completions.with_raw_response.create(
        model="assistant", messages=[{"role": "user", "content": "Tell me a long story about the sea."}],
        stream=True, max_tokens=400,
    )
    stream = raw.parse()
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break  # the first words are enough
    await stream.close()
    conversation_id, reply_id = UUID(raw.headers["x-chat-conversation-id"]), reply_id_of(chunk.id)

    reply = await async_eventually(lambda: chat_app.repository.get(conversation_id).reply(reply_id),
                                   until=lambda reply: reply["status"] != "pending", timeout=60, interval=0.1,
                                   what="the reply's outcome")
    # normally cut short; a reply that ended on its own first is fine too
    assert reply["status"] == "complete" and reply["finish_reason"] in {"cancelled", "stop", "length"}

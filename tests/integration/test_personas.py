"""Personas as users manage them: create, edit (a new version each time), retire, and
replies that record the persona version they were written with."""

from __future__ import annotations

import uuid
from uuid import UUID

import pytest

from domain.conversation import Conversation
from tests.client import ChatClient, collect_reply, send
from tests.waiting import async_eventually

pytestmark = pytest.mark.integration


def persona_body(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "slug": f"pal-{uuid.uuid4().hex[:8]}", "name": "Pal", "system_prompt": "You are {{user_name}}'s friend.",
        "avatar": "🦊", "greeting": "Hey!", "starters": ["What's up?"], "temperature": 0.7, "visibility": "private",
    }
    return {**body, **overrides}


async def test_a_user_creates_edits_and_retires_a_persona_with_every_edit_a_version(
    client: ChatClient, other_client: ChatClient
) -> None:
    r = await client.http.post("/api/personas", json=persona_body(), headers=client.headers)
    assert r.status_code == 201, r.text
    persona = r.json()
    assert persona["version"] == 1 and persona["owner_id"] == client.user_id and persona["avatar"] == "🦊"

    r = await client.http.patch(f"/api/personas/{persona['id']}", json={"name": "Best Pal", "temperature": 0.5},
                                headers=client.headers)
    assert r.status_code == 200, r.text
    assert (r.json()["version"], r.json()["name"], r.json()["temperature"]) == (2, "Best Pal", 0.5)

    versions = (await client.get(f"/api/personas/{persona['id']}/versions")).json()
    assert [(v["version"], v["name"]) for v in versions] == [(1, "Pal"), (2, "Best Pal")]

    # private: listed for its owner only, and invisible to others
    async def listed(c: ChatClient) -> list[str]:
        return [p["id"] for p in (await c.get("/api/personas")).json()]

    await async_eventually(lambda: _contains(listed(client), persona["id"]), timeout=10, interval=0.05,
                           what="the persona listed for its owner")
    assert persona["id"] not in await listed(other_client)
    assert (await other_client.get(f"/api/personas/{persona['id']}")).status_code == 404
    r = await other_client.http.patch(f"/api/personas/{persona['id']}", json={"name": "Mine"}, headers=other_client.headers)
    assert r.status_code == 404

    r = await client.http.delete(f"/api/personas/{persona['id']}", headers=client.headers)
    assert r.status_code == 204
    await async_eventually(lambda: _lacks(listed(client), persona["id"]), timeout=10, interval=0.05,
                           what="the retired persona no longer listed")
    r = await client.http.post("/api/conversations", json={"persona_id": persona["id"]}, headers=client.headers)
    assert r.status_code == 404


async def _contains(listing, item) -> bool:  # type: ignore[no-untyped-def]
    return item in await listing


async def _lacks(listing, item) -> bool:  # type: ignore[no-untyped-def]
    return item not in await listing


async def test_built_in_personas_cannot_be_changed_by_users(client: ChatClient) -> None:
    builtin = next(p for p in (await client.get("/api/personas")).json() if p["slug"] == "pirate")
    r = await client.http.patch(f"/api/personas/{builtin['id']}", json={"name": "Landlubber"}, headers=client.headers)
    assert r.status_code == 403
    r = await client.http.delete(f"/api/personas/{builtin['id']}", headers=client.headers)
    assert r.status_code == 403


async def test_bad_persona_input_gets_clear_errors(client: ChatClient) -> None:
    cases = [
        (persona_body(slug="Not A Slug"), 400),
        (persona_body(temperature=9.0), 400),
        (persona_body(visibility="secret"), 400),
        (persona_body(starters=["x" * 300]), 400),
        ({"slug": "only-slug"}, 400),
        ({**persona_body(), "colour": "red"}, 400),
    ]
    for body, status in cases:
        r = await client.http.post("/api/personas", json=body, headers=client.headers)
        assert r.status_code == status, (body, r.text)
    body = persona_body()
    assert (await client.http.post("/api/personas", json=body, headers=client.headers)).status_code == 201
    r = await client.http.post("/api/personas", json=body, headers=client.headers)
    assert r.status_code == 409 and r.json()["code"] == "slug_taken"


async def test_a_reply_records_the_persona_version_it_used_and_fills_in_the_user_name(
    client: ChatClient, chat_app
) -> None:
    persona = (await client.http.post("/api/personas", json=persona_body(), headers=client.headers)).json()
    await client.http.patch(f"/api/personas/{persona['id']}", json={"greeting": "Yo!"}, headers=client.headers)
    conversation_id = await client.start_conversation(persona["id"])
    async with client.ws() as ws:
        await send(ws, conversation_id, "Hello friend")
        accepted, _, _ = await collect_reply(ws)
    events = list(chat_app.events.get(UUID(conversation_id)))
    request = next(e for e in events if isinstance(e, Conversation.ReplyRequested))
    assert request.persona_version == 2
    completed = next(e for e in events if isinstance(e, Conversation.ReplyCompleted))
    assert completed.model_name == "chat" and completed.model_version == "1"
    job = chat_app.reply_job(UUID(conversation_id), UUID(accepted["reply_id"]))
    assert job.messages[0]["content"] == f"You are {client.email.split('@')[0]}'s friend."


async def test_versions_written_while_private_stay_private(client: ChatClient, other_client: ChatClient) -> None:
    r = await client.http.post("/api/personas", json=persona_body(system_prompt="SECRET-PLAN: be a spy."),
                               headers=client.headers)
    persona = r.json()
    r = await client.http.patch(f"/api/personas/{persona['id']}",
                                json={"visibility": "public", "system_prompt": "You are a cheerful guide."},
                                headers=client.headers)
    assert r.status_code == 200, r.text
    mine = (await client.get(f"/api/personas/{persona['id']}/versions")).json()
    assert [v["visibility"] for v in mine] == ["private", "public"], "its creator sees every version"
    for viewer in (other_client.http.get(f"/api/personas/{persona['id']}/versions", headers=other_client.headers),
                   other_client.http.get(f"/api/personas/{persona['id']}/versions")):  # and anonymously
        r = await viewer
        assert r.status_code == 200, r.text
        assert [v["version"] for v in r.json()] == [2] and "SECRET-PLAN" not in r.text


async def test_a_persona_made_private_or_retired_stops_answering_in_others_chats(
    client: ChatClient, other_client: ChatClient
) -> None:
    r = await client.http.post("/api/personas", json=persona_body(visibility="public"), headers=client.headers)
    persona = r.json()
    theirs = await other_client.start_conversation(persona["id"])
    mine = await client.start_conversation(persona["id"])
    async with other_client.ws() as ws:
        await send(ws, theirs, "Hello!")
        await collect_reply(ws)

    r = await client.http.patch(f"/api/personas/{persona['id']}", json={"visibility": "private"}, headers=client.headers)
    assert r.status_code == 200, r.text
    async with other_client.ws() as ws:
        await send(ws, theirs, "Still there?")
        error = await recv_error(ws)
    assert error["code"] == "persona_unavailable" and "made private" in error["message"]
    async with client.ws() as ws:  # its creator still chats with it
        await send(ws, mine, "Hi, it's me.")
        _, _, reply = await collect_reply(ws)
        assert reply["text"]

    r = await client.http.delete(f"/api/personas/{persona['id']}", headers=client.headers)
    assert r.status_code == 204
    async with client.ws() as ws:
        await send(ws, mine, "And now?")
        error = await recv_error(ws)
    assert error["code"] == "persona_unavailable" and "retired" in error["message"]
    # the history stays readable
    messages = await other_client.messages_when(theirs, lambda ms: len(ms) == 2)
    assert [m["text"] for m in messages if m["role"] == "user"] == ["Hello!"]


async def recv_error(ws) -> dict[str, object]:  # type: ignore[no-untyped-def]
    from tests.client import recv

    while True:
        frame = await recv(ws, timeout=30)
        if frame["type"] == "error":
            return frame


async def test_slugs_are_per_creator_and_taking_one_reveals_nothing(client: ChatClient, other_client: ChatClient) -> None:
    from tests.integration.test_openai_api import create_key

    body = persona_body()  # private
    r = await client.http.post("/api/personas", json=body, headers=client.headers)
    assert r.status_code == 201, r.text
    r = await other_client.http.post("/api/personas", json={**body, "visibility": "public", "name": "Other Pal"},
                                     headers=other_client.headers)
    assert r.status_code == 201, r.text  # the same slug: nothing says someone else has it
    theirs = r.json()
    r = await client.http.post("/api/personas", json=body, headers=client.headers)
    assert r.status_code == 409 and r.json()["code"] == "slug_taken" and "you have" in r.json()["detail"]
    r = await client.http.post("/api/personas", json=persona_body(slug="pirate"), headers=client.headers)
    assert r.status_code == 409 and "built-in" in r.json()["detail"]

    # over /v1 the client's own persona answers to the slug, the other user's public one to its id
    key = (await create_key(client, "slugs"))["key"]
    auth = {"authorization": f"Bearer {key}"}

    async def models() -> list[str]:
        r = await client.http.get("/v1/models", headers=auth)
        return [m["id"] for m in r.json()["data"]]

    await async_eventually(lambda: _contains(models(), theirs["id"]), timeout=10, interval=0.05,
                           what="the other user's public persona among the models")
    assert body["slug"] in await models()
    r = await client.http.post("/v1/chat/completions", headers=auth, json={
        "model": theirs["id"], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert r.status_code == 200, r.text

"""Personas as users manage them: create, edit (a new version each time), retire, and
replies that record the persona version they were written with."""

from __future__ import annotations

import asyncio
import uuid
from uuid import UUID

import pytest

from domain.conversation import Conversation
from tests.client import ChatClient, collect_reply, send

pytestmark = pytest.mark.integration


def persona_body(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "slug": f"pal-{uuid.uuid4().hex[:8]}", "name": "Pal", "system_prompt": "You are {{user_name}}'s friend.",
        "avatar": "🦊", "greeting": "Hey!", "starters": ["What's up?"], "temperature": 0.7, "visibility": "private",
    }
    return {**body, **overrides}


async def wait_for(check, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not (result := await check()) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    return result


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

    assert await wait_for(lambda: _contains(listed(client), persona["id"]))
    assert persona["id"] not in await listed(other_client)
    assert (await other_client.get(f"/api/personas/{persona['id']}")).status_code == 404
    r = await other_client.http.patch(f"/api/personas/{persona['id']}", json={"name": "Mine"}, headers=other_client.headers)
    assert r.status_code == 404

    r = await client.http.delete(f"/api/personas/{persona['id']}", headers=client.headers)
    assert r.status_code == 204
    assert await wait_for(lambda: _lacks(listed(client), persona["id"]))
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

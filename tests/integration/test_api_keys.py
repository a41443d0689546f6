"""API keys against the real stack: when each was made and last used, and its setting that
lists the chats it starts through `/v1` apart (`via_api` in the read model), made, listed,
changed and refused when it does not fit."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import httpx
import pytest

from api.key_use import KeyUseStore
from projections.readmodels import read_model_recorder
from tests.client import ChatClient
from tests.waiting import async_eventually

pytestmark = pytest.mark.integration
WAIT_S = 15.0


async def create_key(client: ChatClient, **body: Any) -> dict[str, Any]:
    r = await client.http.post("/api/keys", json={"name": "tests", **body}, headers=client.headers)
    assert r.status_code == 201, r.text
    return dict(r.json())


async def listed(client: ChatClient, key_id: str) -> dict[str, Any]:
    r = await client.get("/api/keys")
    assert r.status_code == 200, r.text
    [key] = [k for k in r.json() if k["key_id"] == key_id]
    return dict(key)


async def complete(api_url: str, key: str) -> UUID:
    """One short chat completion with the key; the conversation that records it."""
    async with httpx.AsyncClient(base_url=api_url, timeout=180) as http:
        r = await http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                            json={"model": "assistant", "max_tokens": 4,
                                  "messages": [{"role": "user", "content": "Say hi."}]})
    assert r.status_code == 200, r.text
    return UUID(r.headers["x-chat-conversation-id"])


async def via_api(client: ChatClient, conversation_id: UUID) -> bool:
    """The conversation's `via_api`, once the read model holds its reply (so every event
    before the reply, `ListedApart` included, is applied)."""
    await client.messages_when(str(conversation_id), lambda ms: any(m["role"] == "assistant" for m in ms), WAIT_S)
    r = await client.get(f"/api/conversations/{conversation_id}")
    assert r.status_code == 200, r.text
    return bool(r.json()["via_api"])


async def test_a_key_shows_when_it_was_made_and_its_last_use_once_it_opened_v1(
    client: ChatClient, api_url: str
) -> None:
    made = await create_key(client)
    before = await listed(client, made["key_id"])
    assert before["last_used_at"] is None and before["created_at"] is not None
    assert before["list_apart"] is True and made["list_apart"] is True
    async with httpx.AsyncClient(base_url=api_url) as http:
        r = await http.get("/v1/models", headers={"Authorization": f"Bearer {made['key']}"})
        assert r.status_code == 200, r.text

    async def used() -> str | None:
        return (await listed(client, made["key_id"]))["last_used_at"]

    # a key's use is recorded a little later
    last_used = await async_eventually(used, timeout=WAIT_S, interval=0.1, what="the key's last use")
    assert last_used >= before["created_at"]


async def test_the_chats_of_a_key_listed_apart_are_via_api_and_follow_its_setting(
    client: ChatClient, api_url: str
) -> None:
    apart = await create_key(client, name="script")
    mine = await create_key(client, name="mine", list_apart=False)
    assert (await listed(client, mine["key_id"]))["list_apart"] is False
    assert await via_api(client, await complete(api_url, apart["key"])) is True
    assert await via_api(client, await complete(api_url, mine["key"])) is False

    r = await client.http.patch(f"/api/keys/{mine['key_id']}", json={"list_apart": True}, headers=client.headers)
    assert r.status_code == 200, r.text
    assert r.json()["list_apart"] is True and (await listed(client, mine["key_id"]))["list_apart"] is True
    assert await via_api(client, await complete(api_url, mine["key"])) is True  # its chats from now on


async def test_bad_names_settings_and_unknown_keys_are_refused(
    client: ChatClient, other_client: ChatClient
) -> None:
    for body in ({"name": ""}, {"name": "x" * 101}, {"name": "ok", "list_apart": "yes"}, {"name": "ok", "extra": 1}):
        r = await client.http.post("/api/keys", json=body, headers=client.headers)
        assert r.status_code == 400, (body, r.text)
    made = await create_key(client)
    path = f"/api/keys/{made['key_id']}"
    for body in ({"list_apart": "off"}, {}, {"list_apart": True, "name": "renamed"}):
        r = await client.http.patch(path, json=body, headers=client.headers)
        assert r.status_code == 400, (body, r.text)
    r = await client.http.patch("/api/keys/0123456789abcdef", json={"list_apart": False}, headers=client.headers)
    assert r.status_code == 404 and r.json()["code"] == "api_key_not_found"
    r = await other_client.http.patch(path, json={"list_apart": False}, headers=other_client.headers)
    assert r.status_code == 404  # not theirs
    assert (await client.http.delete(path, headers=client.headers)).status_code == 204
    r = await client.http.patch(path, json={"list_apart": False}, headers=client.headers)
    assert r.status_code == 404  # revoked
    assert (await listed(client, made["key_id"]))["revoked"] is True


async def test_erasing_the_account_deletes_its_keys_last_uses(client: ChatClient, api_url: str, stack: Any) -> None:
    made = await create_key(client)
    async with httpx.AsyncClient(base_url=api_url) as http:
        assert (await http.get("/v1/models", headers={"Authorization": f"Bearer {made['key']}"})).status_code == 200
    await async_eventually(lambda: _true_if_used(client, made["key_id"]), timeout=WAIT_S, interval=0.1,
                           what="the key's last use")
    recorder = read_model_recorder(stack.settings.eventsourcing_env())
    try:
        store = KeyUseStore(recorder)
        assert made["key_id"] in store.last_used(UUID(client.user_id))
        r = await client.http.request("DELETE", "/api/me", json={"password": client.password}, headers=client.headers)
        assert r.status_code == 204, r.text
        assert store.last_used(UUID(client.user_id)) == {}
    finally:
        recorder.datastore.close()


async def _true_if_used(client: ChatClient, key_id: str) -> bool:
    return (await listed(client, key_id))["last_used_at"] is not None

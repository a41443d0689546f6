"""Export, ChatGPT import and share links through the real API."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.client import ChatClient, collect_reply, send
from tests.fakes import chatgpt_export
from tests.waiting import async_eventually

pytestmark = pytest.mark.integration


async def test_export_json_and_markdown_and_all(client: ChatClient) -> None:
    cid = await client.start_conversation()
    async with client.ws() as ws:
        await send(ws, cid, "Hello, who are you?")
        accepted, _, reply = await collect_reply(ws)
        await ws.send(json.dumps({"type": "regenerate", "conversation_id": cid, "message_id": accepted["reply_id"]}))
        _, _, second = await collect_reply(ws)
    r = await client.get(f"/api/conversations/{cid}/export")
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    export = r.json()
    assert export["format"] == "chatbot.conversation.v1" and export["persona"]["slug"] == "assistant"
    assert [m["role"] for m in export["messages"]] == ["user", "assistant", "assistant"]
    assert {m["text"] for m in export["messages"][1:]} == {reply["text"], second["text"]}
    assert all(m["created_at"] and m.get("model", "").startswith("chat/") for m in export["messages"][1:])

    r = await client.get(f"/api/conversations/{cid}/export?format=markdown")
    assert r.status_code == 200 and r.headers["content-type"] == "text/markdown; charset=utf-8"
    assert "**You:**" in r.text and second["text"].strip()[:20] in r.text and "1 other version" in r.text
    assert (await client.get(f"/api/conversations/{cid}/export?format=pdf")).status_code == 400

    r = await client.get("/api/export")
    assert r.status_code == 200 and [c["id"] for c in r.json()["conversations"]] in ([cid], [])


async def test_import_chatgpt_export(client: ChatClient) -> None:
    r = await client.http.post("/api/import", content=json.dumps(chatgpt_export()), headers=client.headers)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["imported"] == 1 and [s["index"] for s in body["skipped"]] == [1, 2]
    cid = body["conversation_ids"][0]
    messages = await client.messages_when(cid, lambda ms: len(ms) == 3)
    assert [m["text"] for m in messages] == ["What causes tides?", "Mostly the Moon's gravity.", "And this picture?"]
    assert len(messages[0]["siblings"]) == 2
    async def titles() -> list[str]:
        return [c["title"] for c in (await client.get("/api/conversations")).json()]

    await async_eventually(titles, until=lambda titles: "Tides" in titles, timeout=5, interval=0.05,
                           what="the imported chat listed by its title")
    r = await client.http.post("/api/import", content=json.dumps(chatgpt_export()), headers=client.headers)
    assert r.status_code == 201, r.text  # the same file again: nothing is duplicated, and it says so
    assert (r.json()["imported"], r.json()["duplicates"]) == (0, 1)
    assert [s for s in r.json()["skipped"] if s["duplicate"]][0]["reason"] == "imported already (as “Tides”)"

    r = await client.http.post("/api/import", content=b"{not json", headers=client.headers)
    assert r.status_code == 400 and "not JSON" in r.text
    r = await client.http.post("/api/import", content=b'"a string"', headers=client.headers)
    assert r.status_code == 400 and "list of ChatGPT conversations, or this app's export" in r.text
    async with httpx.AsyncClient(base_url=client.base_url) as anonymous:
        assert (await anonymous.post("/api/import", content=b"[]")).status_code == 401


async def exchange(client: ChatClient, text: str) -> tuple[str, dict]:
    """A new conversation with one message and its reply, in the read models; (its id, the reply frame)."""
    cid = await client.start_conversation()
    async with client.ws() as ws:
        await send(ws, cid, text)
        _, _, reply = await collect_reply(ws)
    await client.messages_when(cid, lambda ms: len(ms) == 2 and ms[1]["status"] == "complete")
    return cid, reply


async def test_the_apps_own_export_imports_into_another_account_once(client: ChatClient, other_client: ChatClient) -> None:
    cid, reply = await exchange(client, "Tell me about the sea")
    everything = (await client.get("/api/export")).content

    r = await other_client.http.post("/api/import", content=everything, headers=other_client.headers)
    assert r.status_code == 201, r.text
    assert (r.json()["imported"], r.json()["skipped"]) == (1, [])
    copy = str(r.json()["conversation_ids"][0])
    messages = await other_client.messages_when(copy, lambda ms: len(ms) == 2)
    assert [(m["role"], m["text"]) for m in messages] == [("user", "Tell me about the sea"), ("assistant", reply["text"])]
    r = await other_client.http.post("/api/import", content=everything, headers=other_client.headers)
    assert (r.json()["imported"], r.json()["duplicates"]) == (0, 1)
    r = await client.http.post("/api/import", content=everything, headers=client.headers)  # its own account
    assert (r.json()["imported"], r.json()["duplicates"]) == (0, 1)


async def test_a_share_link_shows_a_snapshot_until_revoked(client: ChatClient, other_client: ChatClient) -> None:
    cid, reply = await exchange(client, "Share this please")
    r = await client.http.post(f"/api/conversations/{cid}/shares", headers=client.headers)
    assert r.status_code == 201, r.text
    share = r.json()
    assert share["url"] == f"/s/{share['id']}"
    r = await other_client.http.post(f"/api/conversations/{cid}/shares", headers=other_client.headers)
    assert r.status_code == 404  # only the owner shares

    async with httpx.AsyncClient(base_url=client.base_url) as anonymous:
        r = await async_eventually(lambda: anonymous.get(share["api_url"]), until=lambda r: r.status_code == 200,
                                   timeout=5, interval=0.05, what="the share link answering")
        snapshot = r.json()
        assert [(m["role"], m["text"]) for m in snapshot["messages"]] == [
            ("user", "Share this please"), ("assistant", reply["text"])]
        assert snapshot["persona_name"]

        # later messages do not change the snapshot
        async with client.ws() as ws:
            await send(ws, cid, "Something private")
            await collect_reply(ws)
        await client.messages_when(cid, lambda ms: len(ms) == 4 and ms[3]["status"] == "complete")
        assert len((await anonymous.get(share["api_url"])).json()["messages"]) == 2

        listed = (await client.get(f"/api/conversations/{cid}/shares")).json()
        assert [s["id"] for s in listed] == [share["id"]] and not listed[0]["revoked"]
        r = await client.http.delete(f"/api/conversations/{cid}/shares/{share['id']}", headers=client.headers)
        assert r.status_code == 204
        await async_eventually(lambda: anonymous.get(share["api_url"]), until=lambda r: r.status_code == 404,
                               timeout=5, interval=0.05, what="the revoked share link gone (404)")
        r = await client.http.delete(f"/api/conversations/{cid}/shares/{cid}", headers=client.headers)
        assert r.status_code == 404 and r.json()["code"] == "share_not_found"

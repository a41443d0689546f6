"""Message trees over the real stack: regenerate, edit, branch switching, resumable
streams, and conversation management (titles, rename, archive, delete, search, paging)."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.client import ChatClient, collect_reply, recv, send
from tests.integration.test_reliability_and_storage import long_talker
from tests.waiting import async_eventually

pytestmark = pytest.mark.integration


def done(n: int):
    return lambda ms: len(ms) >= n and all(m["status"] != "pending" for m in ms)


async def test_regenerate_and_edit_make_branches_that_rest_and_the_prompt_follow(client: ChatClient) -> None:
    cid = await client.start_conversation()
    async with client.ws() as ws:
        await send(ws, cid, "Hello there, how are you?")
        first, _, first_reply = await collect_reply(ws)
        await ws.send(json.dumps({"type": "regenerate", "conversation_id": cid, "message_id": first["reply_id"]}))
        again, tokens, again_reply = await collect_reply(ws)
    assert again["message_id"] == first["message_id"] and again["reply_id"] != first["reply_id"]
    assert again_reply["text"] == "".join(t["text"] for t in tokens)

    branch = await client.messages_when(cid, lambda ms: len(ms) == 2 and ms[1]["id"] == again["reply_id"]
                                        and ms[1]["status"] == "complete")
    assert [m["id"] for m in branch] == [first["message_id"], again["reply_id"]]
    assert branch[1]["siblings"] == [first["reply_id"], again["reply_id"]]
    assert branch[1]["parent_id"] == first["message_id"] and branch[0]["parent_id"] is None

    async with client.ws() as ws:
        await ws.send(json.dumps({"type": "edit", "conversation_id": cid, "message_id": first["message_id"],
                                  "text": "Tell me about ships."}))
        edited, _, _ = await collect_reply(ws)
    branch = await client.messages_when(cid, lambda ms: ms and ms[0]["id"] == edited["message_id"]
                                        and ms[-1]["status"] == "complete")
    assert branch[0]["text"] == "Tell me about ships."
    assert branch[0]["siblings"] == [first["message_id"], edited["message_id"]]

    # back to the first branch: it ends at its newest leaf, the regenerated reply
    r = await client.http.post(f"/api/conversations/{cid}/branch", json={"message_id": first["message_id"]},
                               headers=client.headers)
    assert r.status_code == 200, r.text
    assert [m["id"] for m in r.json()] == [first["message_id"], again["reply_id"]]
    assert r.json()[1]["text"] == again_reply["text"]
    branch = await client.messages_when(cid, lambda ms: ms and ms[-1]["id"] == again["reply_id"])
    assert [m["id"] for m in branch] == [first["message_id"], again["reply_id"]]


async def test_bad_branch_requests_get_clear_errors(client: ChatClient, other_client: ChatClient) -> None:
    cid = await client.start_conversation()
    async with client.ws() as ws:
        await send(ws, cid, "Hi!")
        accepted, _, _ = await collect_reply(ws)
        await ws.send(json.dumps({"type": "regenerate", "conversation_id": cid, "message_id": str(uuid.uuid4())}))
        assert (await recv(ws))["code"] == "not_found"
        await ws.send(json.dumps({"type": "edit", "conversation_id": cid, "message_id": accepted["reply_id"],
                                  "text": "x"}))
        frame = await recv(ws)
        assert frame["code"] == "rejected" and "only a user message" in frame["message"]
        await ws.send(json.dumps({"type": "edit", "conversation_id": cid, "message_id": accepted["message_id"]}))
        assert (await recv(ws))["code"] == "invalid"
    async with other_client.ws() as ws:  # not theirs
        await ws.send(json.dumps({"type": "regenerate", "conversation_id": cid, "message_id": accepted["reply_id"]}))
        assert (await recv(ws))["code"] == "not_found"
    r = await client.http.post(f"/api/conversations/{cid}/branch", json={"message_id": str(uuid.uuid4())},
                               headers=client.headers)
    assert r.status_code == 404 and r.json()["code"] == "message_not_found"
    r = await other_client.http.post(f"/api/conversations/{cid}/branch", json={"message_id": accepted["message_id"]},
                                     headers=other_client.headers)
    assert r.status_code == 404


async def test_a_client_that_reconnects_mid_reply_gets_the_text_so_far_then_the_rest(client: ChatClient, chat_app) -> None:
    cid = await client.start_conversation(long_talker(chat_app))  # a long reply
    async with client.ws() as ws:
        await send(ws, cid, "Tell me a very long story.")
        accepted = await recv(ws)
        seen = ""
        while len(seen) < 20:  # part of it, then the connection drops
            frame = await recv(ws)
            assert frame["type"] == "token"
            seen += frame["text"]
    async with client.ws() as ws:  # a refresh: a new socket
        await ws.send(json.dumps({"type": "resume", "conversation_id": cid}))
        resumed = await recv(ws)
        assert resumed == {"type": "resumed", "conversation_id": cid, "reply_id": accepted["reply_id"]}
        text = ""
        while (frame := await recv(ws))["type"] == "token":
            text += frame["text"]
    assert frame["type"] == "reply"
    assert text == frame["text"], "the text so far and the rest add up to the reply, nothing lost or doubled"
    assert frame["text"].startswith(seen)
    async with client.ws() as ws:  # nothing pending now
        await ws.send(json.dumps({"type": "resume", "conversation_id": cid}))
        assert await recv(ws) == {"type": "resumed", "conversation_id": cid, "reply_id": None}


async def test_titles_rename_archive_delete_search_and_paging(client: ChatClient, chat_app) -> None:
    word = f"zebra{uuid.uuid4().hex[:6]}"
    ids = []
    async with client.ws() as ws:
        for text in (f"What do {word} eat in winter?", "Plan a trip to Lisbon", "Explain photosynthesis simply"):
            cid = await client.start_conversation()
            ids.append(cid)
            await send(ws, cid, text)
            await collect_reply(ws)

    async def listing(query: str = "") -> list[dict]:
        async def rows() -> list[dict]:
            r = await client.get(f"/api/conversations{query}")
            assert r.status_code == 200, r.text
            return list(r.json())

        return await async_eventually(rows, until=lambda rows: all(c["title"] != "New chat" for c in rows), timeout=10,
                                      interval=0.05, what=f"every chat listed ({query}) titled", fail=False)

    rows = await listing()
    assert [c["id"] for c in rows] == ids[::-1]  # newest first
    titles = await client.titles_when_shown(chat_app, ids[0])
    assert titles[0] == f"What do {word} eat in winter?"  # titled after the first reply (then maybe by the model)
    page = await listing("?limit=2")
    assert [c["id"] for c in page] == ids[:0:-1]
    rest = await listing(f"?limit=2&before={page[-1]['updated_at']}")
    assert [c["id"] for c in rest] == ids[:1]
    assert [c["id"] for c in await listing(f"?q={word.upper()}")] == [ids[0]]  # title, any case
    assert [c["id"] for c in await listing("?q=100%25")] == []  # % is a character, not a wildcard

    r = await client.http.patch(f"/api/conversations/{ids[1]}", json={"title": "Lisbon weekend"}, headers=client.headers)
    assert r.status_code == 204, r.text
    r = await client.http.patch(f"/api/conversations/{ids[2]}", json={"archived": True}, headers=client.headers)
    assert r.status_code == 204, r.text
    r = await client.http.patch(f"/api/conversations/{ids[2]}", json={"title": ""}, headers=client.headers)
    assert r.status_code == 400
    r = await client.http.patch(f"/api/conversations/{ids[2]}", json={"colour": "red"}, headers=client.headers)
    assert r.status_code == 400
    r = await client.http.delete(f"/api/conversations/{ids[0]}", headers=client.headers)
    assert r.status_code == 204, r.text

    async def listed() -> list[tuple[str, str]]:
        return [(c["id"], c["title"]) for c in (await client.get("/api/conversations")).json()]

    await async_eventually(listed, until=lambda rows: rows == [(ids[1], "Lisbon weekend")], timeout=10, interval=0.05,
                           what="the renamed chat listed alone")
    archived = (await client.get("/api/conversations?archived=true")).json()
    assert [c["id"] for c in archived] == [ids[2]] and archived[0]["archived"] is True
    assert (await client.get(f"/api/conversations/{ids[0]}/messages")).status_code == 404
    assert (await client.get(f"/api/conversations/{ids[1]}")).json()["title"] == "Lisbon weekend"
    # message text is searched too
    assert [c["id"] for c in (await client.get("/api/conversations?q=lisbon")).json()] == [ids[1]]
    async with client.ws() as ws:  # a deleted conversation takes no more messages
        await send(ws, ids[0], "Are you there?")
        assert (await recv(ws))["code"] == "not_found"


async def test_a_temporary_conversation_is_gone_after_its_time(client: ChatClient, chat_app) -> None:
    from uuid import UUID

    r = await client.http.post("/api/conversations", json={"expires_in_s": 60}, headers=client.headers)
    assert r.status_code == 201, r.text
    cid = r.json()["id"]
    assert r.json()["expires_at"]
    bad = await client.http.post("/api/conversations", json={"expires_in_s": 5}, headers=client.headers)
    assert bad.status_code == 400
    async with client.ws() as ws:
        await send(ws, cid, "Forget this soon")
        await collect_reply(ws)
    # instead of waiting a minute, record that it is due now: the same command with a later clock
    conversation = chat_app.repository.get(UUID(cid))
    assert chat_app.expire_conversation(UUID(cid), now=conversation.expires_at) is True
    await async_eventually(lambda: client.get(f"/api/conversations/{cid}/messages"),
                           until=lambda r: r.status_code == 404, timeout=5, interval=0.05,
                           what="the expired conversation gone (404)")
    assert cid not in [c["id"] for c in (await client.get("/api/conversations")).json()]


async def test_the_retention_job_expires_due_conversations_by_itself(client: ChatClient, chat_app) -> None:
    """The job runs in the projector every second here. One conversation is made temporary
    as if two minutes ago with a minute to live (so it is due), another with an hour."""
    from datetime import datetime, timedelta, timezone
    from uuid import UUID

    due, later = UUID(await client.start_conversation()), UUID(await client.start_conversation())
    conversation = chat_app.repository.get(due)
    conversation.set_retention(timedelta(minutes=1), now=datetime.now(timezone.utc) - timedelta(minutes=2))
    chat_app.save(conversation)
    chat_app.update_conversation(later, UUID(client.user_id), keep_for=timedelta(hours=1))
    await async_eventually(lambda: chat_app.repository.get(due).deleted, timeout=20, interval=0.1,
                           what="the due conversation expired by the job")
    events = [type(e).__name__ for e in chat_app.repository.get(due).collect_events()]
    stored = [n.topic.rsplit(".", 1)[-1] for n in chat_app.recorder.select_events(due)]
    assert stored[-1] == "Expired" and not events
    assert not chat_app.repository.get(later).deleted

    async def listed() -> list[str]:
        return [c["id"] for c in (await client.get("/api/conversations")).json()]

    ids = await async_eventually(listed, until=lambda ids: str(due) not in ids, timeout=5, interval=0.05,
                                 what="the expired conversation gone from the list")
    assert str(later) in ids

"""Large writes never stop the system: a multi-megabyte import is saved in bounded batches
while other users register and chat, and a single statement of megabytes in pipeline mode
(psycopg's half-sent statement, chatbot/runtime/postgres.py) completes instead of hanging."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from typing import Any

import psycopg
import pytest

from chatbot.ops.launcher import Stack
from chatbot.runtime.postgres import flush_pipeline
from tests.client import ChatClient, collect_reply, recv, send
from tests.fakes import node

pytestmark = pytest.mark.integration


def big_export(conversations: int, nodes: int, chars: int) -> list[dict[str, Any]]:
    """A ChatGPT export of long conversations: one chain of alternating turns each."""
    out = []
    for c in range(conversations):
        mapping = {"root": node("root", None, ["n0"], None)}
        for i in range(nodes):
            role = "user" if i % 2 == 0 else "assistant"
            text = f"conversation {c} turn {i} " + os.urandom(chars // 2).hex()[: chars]
            mapping[f"n{i}"] = node(f"n{i}", "root" if i == 0 else f"n{i - 1}",
                                    [f"n{i + 1}"] if i + 1 < nodes else [], role, text)
        out.append({"title": f"Long {c}", "mapping": mapping, "current_node": f"n{nodes - 1}"})
    return out


async def test_a_large_import_leaves_everyone_else_writing(client: ChatClient, api_url: str) -> None:
    export = json.dumps(big_export(conversations=30, nodes=1000, chars=200)).encode()
    assert len(export) > 8_000_000, "a multi-megabyte export"

    started = time.monotonic()
    imported = asyncio.create_task(client.http.post(
        "/api/import", content=export, headers={**client.headers, "content-type": "application/json"}, timeout=300,
    ))
    await asyncio.sleep(0.3)  # the import is under way

    # Meanwhile another user registers, starts a chat and has a message accepted (three
    # writes), promptly; the reply then comes too. The bound is on the writes, which a freeze
    # would stop: the reply's generation only measures how busy the CPU is.
    other = ChatClient(api_url)
    try:
        t0 = time.monotonic()
        await other.register_and_log_in()
        cid = await other.start_conversation()
        async with other.ws() as ws:
            await send(ws, cid, "Hello while someone imports")
            accepted = await recv(ws)
            during = time.monotonic() - t0
            import_running = not imported.done()
            _, _, reply = await collect_reply(ws)
        assert accepted["type"] == "accepted" and reply["type"] == "reply"

        r = await imported
        assert r.status_code == 201, r.text[:500]
        body = r.json()
        assert body["imported"] == 30 and body["skipped"] == []
        took = time.monotonic() - started
        print(f"import of {len(export) / 1e6:.1f} MB: {took:.1f} s; another user's register+send meanwhile: "
              f"{during:.1f} s (import still running then: {import_running})")
        assert during < 30, f"another user's register, new chat and send took {during:.1f} s during the import"

        # Afterwards the system still takes writes at once.
        t0 = time.monotonic()
        cid2 = await other.start_conversation()
        assert time.monotonic() - t0 < 5
        messages = await client.messages_when(body["conversation_ids"][0], lambda ms: len(ms) == 1000, timeout=120)
        assert messages[-1]["text"].startswith("conversation 0 turn 999 ")
        assert cid2
    finally:
        await other.close()


def test_a_statement_of_megabytes_in_pipeline_mode_completes(stack: Stack) -> None:
    """Without `flush_pipeline` the insert is left half-sent and `sync()` waits forever."""
    done: dict[str, Any] = {}

    def insert() -> None:
        with psycopg.connect(stack.settings.pg_conninfo, autocommit=True) as conn:
            conn.execute("CREATE TEMP TABLE big (b bytea)")
            with conn.pipeline() as pipeline, conn.transaction():
                conn.execute("INSERT INTO big VALUES (%s)", (os.urandom(4 << 20),))
                flush_pipeline(conn)
                pipeline.sync()
            done["n"] = conn.execute("SELECT length(b) FROM big").fetchone()[0]

    thread = threading.Thread(target=insert, daemon=True)
    thread.start()
    thread.join(30)
    assert done.get("n") == 4 << 20, "the pipelined 4 MB insert did not complete within 30 s"


def test_the_event_store_saves_an_event_of_megabytes(chat_app: Any) -> None:
    """Through the recorder (group commit, hash chain, pipeline): one conversation whose
    import is several megabytes is saved in bounded events, and reads back whole."""
    user = chat_app.register_user(f"big-{os.urandom(4).hex()}@example.com", "correct horse battery")
    export = big_export(conversations=1, nodes=400, chars=7900)
    done: dict[str, Any] = {}

    def save() -> None:
        done["result"] = chat_app.import_conversations(user, export)

    thread = threading.Thread(target=save, daemon=True)
    thread.start()
    thread.join(60)
    assert "result" in done, "the import did not finish within 60 s"
    (cid,) = done["result"]["conversation_ids"]
    stored = chat_app.recorder.select_events(cid)
    assert len(stored) >= 6, "3.2 M characters are recorded in several events of at most 0.5 M characters"
    conversation = chat_app.repository.get(cid)
    assert len(conversation.nodes) == 400

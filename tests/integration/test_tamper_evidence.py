"""`chatbot audit --verify`: events altered or deleted in PostgreSQL behind the application's
back are named, and a tampered snapshot is named and never loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg.rows import dict_row

from chatbot.bus.messaging import event_name
from chatbot.eventstore.application import SNAPSHOT_INTERVAL
from chatbot.ops.launcher import Stack
from tests.client import ChatClient, collect_reply, send

pytestmark = pytest.mark.integration
OUTCOME = dict(finish_reason="stop", prompt_tokens=3, completion_tokens=2, ttft_ms=1.0, duration_ms=2.0,
               model_name="chat", model_version="1")


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **stack.settings.to_env()}
    return subprocess.run([sys.executable, "-m", "chatbot.ops.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def verify(stack: Stack, *args: str) -> tuple[int, dict[str, Any]]:
    done = cli(stack, "audit", "--verify", "--json", *args)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


async def test_the_verifier_names_an_event_altered_and_one_deleted_in_postgres(
    stack: Stack, client: ChatClient
) -> None:
    conversation_id = await client.start_conversation()
    async with client.ws() as ws:
        for text in ("First question", "Second question"):
            await send(ws, conversation_id, text)
            await collect_reply(ws)
    status, intact = verify(stack, conversation_id)
    assert status == 0 and intact["problems"] == 0 and intact["events"] >= 7
    assert {f["status"] for f in intact["findings"]} == {"ok"}
    assert verify(stack, "--all")[0] == 0

    with psycopg.connect(stack.settings.pg_conninfo, autocommit=True, row_factory=dict_row) as conn:
        rows = {r["originator_version"]: r for r in conn.execute(
            "SELECT * FROM chat_events WHERE originator_id = %s", (UUID(conversation_id),))}
        altered, deleted = rows[2], rows[4]
        tampered = bytes(altered["state"])[:-1] + bytes([altered["state"][-1] ^ 1])
        try:
            conn.execute("UPDATE chat_events SET state = %s WHERE originator_id = %s AND originator_version = 2",
                         (tampered, altered["originator_id"]))
            conn.execute("DELETE FROM chat_events WHERE originator_id = %s AND originator_version = 4",
                         (deleted["originator_id"],))

            text = cli(stack, "audit", "--verify", conversation_id)
            assert text.returncode == 1, text.stdout + text.stderr
            lines = [line.split() for line in text.stdout.splitlines()]
            assert ["altered", conversation_id, "v2", event_name(altered["topic"])] in lines
            assert ["removed", conversation_id, "v4"] in lines
            assert "1 altered, 1 removed" in text.stdout

            status, report = verify(stack, conversation_id)
            by_version = {f["version"]: (f["status"], f["type"]) for f in report["findings"]}
            assert status == 1 and report["problems"] == 2
            assert by_version[2] == ("altered", event_name(altered["topic"]))
            assert by_version[4] == ("removed", "")
            assert {s for v, (s, _) in by_version.items() if v not in (2, 4)} == {"ok"}

            reading = cli(stack, "audit", conversation_id, "--reason", "a look at a damaged history")
            assert reading.returncode == 1 and f"chatbot audit --verify {conversation_id}" in reading.stderr

            status, everything = verify(stack, "--all")
            assert status == 1
            assert [(f["originator_id"], f["version"], f["status"]) for f in everything["findings"]
                    if f["status"] != "erased"] == [(conversation_id, 2, "altered"), (conversation_id, 4, "removed")]
        finally:  # put the rows back as they were, for the other tests of the session
            conn.execute("UPDATE chat_events SET state = %s WHERE originator_id = %s AND originator_version = 2",
                         (altered["state"], altered["originator_id"]))
            columns = list(deleted)
            conn.execute(f"INSERT INTO chat_events ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))})",
                         [deleted[c] for c in columns])
    assert verify(stack, conversation_id)[0] == 0


async def test_the_newest_events_deleted_are_named_against_the_stream(stack: Stack, client: ChatClient) -> None:
    conversation_id = await client.start_conversation()
    async with client.ws() as ws:
        await send(ws, conversation_id, "Only question")
        await collect_reply(ws)
    status, intact = verify(stack, conversation_id)
    assert status == 0 and intact["stream"].startswith("compared with the stream's 1 aggregates: nothing missing")
    head = max(f["version"] for f in intact["findings"])

    with psycopg.connect(stack.settings.pg_conninfo, autocommit=True, row_factory=dict_row) as conn:
        deleted = list(conn.execute(
            "DELETE FROM chat_events WHERE originator_id = %s AND originator_version >= %s RETURNING *",
            (UUID(conversation_id), head - 1)))
        try:
            assert len(deleted) == 2
            # the chain alone sees nothing: the versions left still run 1, 2, ... without a gap
            status, report = verify(stack, conversation_id)
            assert status == 1 and report["problems"] == 2, report
            assert [(f["version"], f["status"]) for f in report["findings"] if f["status"] != "ok"] == [
                (head - 1, "removed"), (head, "removed")]
            assert "2 newest events missing" in report["stream"]
            text = cli(stack, "audit", "--verify", "--all")
            assert text.returncode == 1 and "2 removed" in text.stdout, text.stdout
        finally:
            columns = list(deleted[0]) if deleted else []
            for row in deleted:
                conn.execute(f"INSERT INTO chat_events ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))})",
                             [row[c] for c in columns])
    assert verify(stack, conversation_id)[0] == 0


async def test_a_tampered_snapshot_is_named_and_the_conversation_is_replayed_instead(stack: Stack, chat_app) -> None:
    user = chat_app.register_user(f"snap-{uuid.uuid4().hex[:10]}@example.com", "correct horse battery")
    conversation_id = chat_app.start_conversation(user)
    turn = 0
    while chat_app.repository.get(conversation_id).version <= SNAPSHOT_INTERVAL + 6:
        posted = chat_app.post_message(conversation_id, user, f"t{turn}", f"message {turn}")
        chat_app.complete_reply(conversation_id, posted.reply_id, text=f"reply {turn}", **OUTCOME)
        turn += 1
    expected = vars(chat_app.repository.get(conversation_id))

    with psycopg.connect(stack.settings.pg_conninfo, autocommit=True) as conn:
        versions = [r[0] for r in conn.execute(
            "SELECT originator_version FROM chat_snapshots WHERE originator_id = %s", (conversation_id,))]
        assert versions == [SNAPSHOT_INTERVAL]
        status, report = verify(stack, str(conversation_id))
        assert status == 0 and [f["status"] for f in report["findings"] if f["type"] == "Snapshot"] == ["snapshot"]
        # Present the old state as a newer one: the events in between would be skipped.
        conn.execute("UPDATE chat_snapshots SET originator_version = %s WHERE originator_id = %s",
                     (SNAPSHOT_INTERVAL + 3, conversation_id))
        try:
            status, report = verify(stack, str(conversation_id))
            assert status == 1
            assert [(f["version"], f["status"]) for f in report["findings"] if f["type"] == "Snapshot"] == [
                (SNAPSHOT_INTERVAL + 3, "snapshot altered")]
            assert vars(chat_app.repository.get(conversation_id)) == expected  # replayed from the events
        finally:
            conn.execute("UPDATE chat_snapshots SET originator_version = %s WHERE originator_id = %s",
                         (SNAPSHOT_INTERVAL, conversation_id))

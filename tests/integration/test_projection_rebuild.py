"""`chatbot projections`: status and lag, and a rebuild that yields exactly the same rows
while the API keeps serving."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import psycopg
import pytest

from chatbot.ops.launcher import Stack
from projections.readmodels import TABLES as READ_MODEL_TABLES
from tests.client import ChatClient, collect_reply, send

pytestmark = pytest.mark.integration
TABLES = tuple(f"rm_{t}" for t in READ_MODEL_TABLES)


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **stack.settings.to_env()}
    return subprocess.run([sys.executable, "-m", "chatbot.ops.cli", "projections", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def snapshot(stack: Stack) -> dict[str, list[tuple]]:
    with psycopg.connect(stack.settings.pg_conninfo) as conn:
        return {t: sorted(map(tuple, conn.execute(f"SELECT * FROM {t}").fetchall()), key=repr) for t in TABLES}


async def test_a_rebuild_on_unchanged_events_yields_the_same_rows_while_the_api_serves(
    stack: Stack, client: ChatClient
) -> None:
    conversation_id = await client.start_conversation()
    async with client.ws() as ws:
        for text in ("One", "Two"):
            await send(ws, conversation_id, text)
            await collect_reply(ws)
    await client.messages_when(conversation_id, lambda ms: len(ms) == 4 and ms[-1]["status"] == "complete")
    await asyncio.sleep(0.3)  # the projector settles the last events
    before = snapshot(stack)

    statuses: list[int] = []
    rebuilding = asyncio.create_task(asyncio.to_thread(cli, stack, "rebuild", "chat", "--json"))
    while not rebuilding.done():  # the API answers throughout
        statuses.append((await client.get(f"/api/conversations/{conversation_id}/messages")).status_code)
        await asyncio.sleep(0.02)
    result = await rebuilding
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["switched"] is True
    assert summary["differences"] == {t: 0 for t in TABLES}
    assert summary["events"] > 0 and summary["events_per_second"] > 0
    assert statuses and set(statuses) == {200}
    assert snapshot(stack) == before

    # the live projector goes on writing into the rebuilt tables
    async with client.ws() as ws:
        await send(ws, conversation_id, "Three")
        await collect_reply(ws)
    messages = await client.messages_when(conversation_id, lambda ms: len(ms) == 6 and ms[-1]["status"] == "complete")
    assert [m["text"] for m in messages if m["role"] == "user"] == ["One", "Two", "Three"]

    status = json.loads(cli(stack, "status", "--json").stdout)
    assert status["projections"]["chat"]["lag"] >= 0 and status["event_store_head"] > 0
    assert status["relay"]["lag"] == 0


async def test_a_dry_run_verifies_without_touching_the_live_tables(stack: Stack) -> None:
    before = snapshot(stack)
    result = cli(stack, "rebuild", "--all", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["switched"] is False
    assert snapshot(stack) == before
    assert cli(stack, "rebuild", "nonsense").returncode == 2

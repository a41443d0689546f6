"""`chatbot audit`: events in order, a conversation reconstructed at a past version or
time, and every look recorded as an event."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import datetime, timezone
from uuid import UUID

import pytest

from chatbot.ops.launcher import Stack
from domain.conversation import Conversation
from tests.client import ChatClient, collect_reply, send

pytestmark = pytest.mark.integration


def run_audit(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **stack.settings.to_env()}
    return subprocess.run([sys.executable, "-m", "chatbot.ops.cli", "audit", *args], env=env,
                          capture_output=True, text=True, timeout=60)


async def test_an_operator_replays_a_conversation_at_any_version_and_the_look_is_recorded(
    stack: Stack, client: ChatClient, chat_app
) -> None:
    conversation_id = await client.start_conversation()
    async with client.ws() as ws:
        await send(ws, conversation_id, "First question")
        _, _, first = await collect_reply(ws)
        between = datetime.now(timezone.utc)
        await send(ws, conversation_id, "Second question")
        await collect_reply(ws)

    full = run_audit(stack, conversation_id, "--json", "--operator", "ops@example.com", "--reason", "support ticket 42")
    assert full.returncode == 0, full.stderr
    report = json.loads(full.stdout)
    assert [e["type"] for e in report["events"]] == [
        "Started", "UserMessagePosted", "ReplyRequested", "ReplyCompleted", "Titled",
        "UserMessagePosted", "ReplyRequested", "ReplyCompleted",
    ]
    assert [e["version"] for e in report["events"]] == list(range(1, 9))
    assert report["events"][3]["actor"].startswith("model:chat/")
    assert [m["role"] for m in report["state"]["messages"]] == ["user", "assistant"] * 2

    at_v3 = json.loads(run_audit(stack, conversation_id, "--json", "--at-version", "3", "--reason", "check").stdout)
    assert [(m["text"], m["status"]) for m in at_v3["state"]["messages"]] == [("First question", "complete"), ("", "pending")]
    at_time = json.loads(run_audit(stack, conversation_id, "--json", "--at", between.isoformat(), "--reason", "check").stdout)
    assert at_time["version"] == 5  # the first reply, and the title given with it
    assert at_time["state"]["messages"][-1]["text"] == first["text"]

    text = run_audit(stack, conversation_id, "--reason", "a human read")
    assert text.returncode == 0 and "First question" in text.stdout and "ReplyCompleted" in text.stdout

    audits = [e for e in chat_app.events.get(UUID(conversation_id)) if isinstance(e, Conversation.Audited)]
    assert [(a.operator, a.reason) for a in audits][0] == ("ops@example.com", "support ticket 42")
    assert len(audits) == 4


async def test_the_audit_tool_refuses_bad_input_clearly(stack: Stack) -> None:
    missing = run_audit(stack, str(uuid.uuid4()), "--reason", "x")
    assert missing.returncode == 1 and "no such conversation" in missing.stderr
    bad = run_audit(stack, "not-a-uuid", "--reason", "x")
    assert bad.returncode == 2 and "badly formed" in bad.stderr
    no_reason = run_audit(stack, str(uuid.uuid4()))
    assert no_reason.returncode == 2 and "--reason" in no_reason.stderr

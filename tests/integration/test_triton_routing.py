"""Two Triton instances: each conversation's replies go to the instance that holds its KV
cache (so its next turn reuses it), and when that instance dies the conversation goes on
on the other one (workers/routing.py).

A stack of its own (not the session `stack`), with `tritons=2`."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
import time
from collections.abc import Iterator

import httpx
import pytest

from chatbot.bus.messaging import partition_of
from chatbot.ops.launcher import Stack
from chatbot.ops.servers import Ports
from chatbot.runtime.config import load_settings
from tests.client import ChatClient, collect_reply, send
from tests.conftest import ARTIFACTS
from tests.waiting import async_eventually

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_tritons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = dataclasses.replace(
        load_settings(tmp_path_factory.mktemp("tritons")), max_reply_tokens=12, auth_attempts_per_address=0,
        model_titles=False,  # a title request after each first reply would add to the counts below
    )
    logs = ARTIFACTS / "logs-tritons"
    shutil.rmtree(logs, ignore_errors=True)
    stack = Stack(settings, Ports.random(), tritons=2, log_dir=logs)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def metric(stack: Stack, instance: int, name: str) -> float:
    """The sum of every series of one metric on one Triton instance."""
    port = stack.triton_ports(instance).triton_metrics
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


async def settled(stack: Stack, instance: int, name: str, want: float, timeout: float = 10) -> float:
    """The metric once it reaches `want` (metrics are pushed every 0.25 s), or its value at the deadline."""
    return await async_eventually(lambda: asyncio.to_thread(metric, stack, instance, name),
                                  until=lambda value: value >= want, timeout=timeout, interval=0.2,
                                  what=f"{name} of instance {instance} at {want}", fail=False)


async def chat(client: ChatClient, conversation_id: str, text: str) -> str:
    async with client.ws() as ws:
        await send(ws, conversation_id, text)
        _, _, reply = await collect_reply(ws, timeout=120)
    assert reply["text"], reply
    return reply["text"]


async def test_a_conversation_stays_on_its_instance_and_fails_over(two_tritons: Stack) -> None:
    stack = two_tritons
    assert len(stack.settings.triton_urls) == 2
    client = ChatClient(stack.api_urls[0])
    await client.register_and_log_in()
    homes: dict[int, str] = {}
    for _ in range(40):
        conversation_id = await client.start_conversation()
        homes.setdefault(partition_of(conversation_id, 2), conversation_id)
        if len(homes) == 2:
            break
    a, b = homes[0], homes[1]

    await chat(client, a, "Hello! What is the capital of France?")
    await chat(client, a, "And of Italy?")
    await chat(client, b, "Hi there!")
    assert await settled(stack, 0, "chat_requests_total", 2) == 2, "both turns of A on its home instance"
    assert await settled(stack, 1, "chat_requests_total", 1) == 1, "B alone on the other"
    # A's second turn found its first turn in instance 0's prefix cache
    assert await settled(stack, 0, "chat_prefix_cache_reused_tokens_total", 20) >= 20

    stack.children["triton"].kill(group=True)  # A's home, with its model's process
    stack.children["triton"].proc.wait(10)
    started = time.monotonic()
    assert await chat(client, a, "Are you still there?")
    assert time.monotonic() - started < 60
    assert await settled(stack, 1, "chat_requests_total", 2) == 2, "A went on on instance 1"
    messages = await client.messages_when(a, lambda ms: len(ms) == 6 and all(m["status"] == "complete" for m in ms),
                                          timeout=30)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    await client.close()

"""The stack on a three-node NATS cluster with partitioned consumers: chats go on while one
node is killed (SIGKILL) and after it comes back.

A stack of its own (not the session `stack`): its own data directory and random ports,
`CHATBOT_PARTITIONS=4` read by two projectors and two groups of workers, each over half
of the partitions through its own durable consumer, and the event stream in 3 replicas."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from collections.abc import AsyncIterator, Iterator
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext

from chatbot.bus.messaging import partition_of
from chatbot.ops.launcher import Stack
from chatbot.ops.servers import Ports
from chatbot.runtime.config import load_settings
from projections.positions import read_positions
from projections.readmodels import read_model_recorder
from tests.client import ChatClient, collect_reply, send, stream_leader
from tests.conftest import ARTIFACTS
from tests.waiting import async_eventually

pytestmark = pytest.mark.integration
PARTITIONS = 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = dataclasses.replace(
        load_settings(tmp_path_factory.mktemp("cluster")), partitions=PARTITIONS, ack_wait_s=5.0, max_reply_tokens=32,
        auth_attempts_per_address=0,
    )
    logs = ARTIFACTS / "logs-cluster"
    shutil.rmtree(logs, ignore_errors=True)
    stack = Stack(settings, Ports.random(), workers=2, worker_groups=2, projectors=2, nats_nodes=3, log_dir=logs)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
async def js(cluster: Stack) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(cluster.settings.nats_servers, max_reconnect_attempts=-1)
    yield nc.jetstream()
    await nc.close()


async def chat(client: ChatClient, conversation_id: str, text: str) -> dict[str, Any]:
    async with client.ws() as ws:
        await send(ws, conversation_id, text)
        _, tokens, reply = await collect_reply(ws, timeout=120)
    assert reply["text"] and "".join(t["text"] for t in tokens) == reply["text"]
    return reply


async def replicas_current(js: JetStreamContext, stream: str, timeout: float = 60) -> Any:
    """The stream's info once it has a leader and two current followers."""
    async def current() -> Any:
        info = await js.stream_info(stream)
        followers = (info.cluster.replicas or []) if info.cluster else []
        if info.cluster and info.cluster.leader and len(followers) == 2 and all(r.current for r in followers):
            return info
        return None

    return await async_eventually(current, timeout=timeout, interval=0.5,
                                  ignore=(nats.errors.Error, TimeoutError),  # no leader for a moment
                                  what="the stream back to three current replicas")


async def test_chats_go_on_while_a_nats_node_dies_and_comes_back(cluster: Stack, js: JetStreamContext) -> None:
    name = cluster.settings.stream_name
    info = await replicas_current(js, name)
    assert info.config.num_replicas == 3
    consumers = {c.name: c.config for c in await js.consumers_info(name)}
    assert set(consumers) == {"projector-chat-p0_2", "projector-chat-p1_3", "workers-p0_2", "workers-p1_3"}
    assert consumers["workers-p1_3"].filter_subjects == [
        "chat.ev.1.Conversation.ReplyRequested", "chat.ev.3.Conversation.ReplyRequested",
    ]

    client = ChatClient(cluster.api_urls[0])
    await client.register_and_log_in()
    # one conversation on each partition, so every projector and worker group has work
    by_partition: dict[int, str] = {}
    for _ in range(60):
        conversation_id = await client.start_conversation()
        by_partition.setdefault(partition_of(conversation_id, PARTITIONS), conversation_id)
        if len(by_partition) == PARTITIONS:
            break
    assert len(by_partition) == PARTITIONS
    conversations = list(by_partition.values())

    first = await asyncio.gather(*(chat(client, c, "Hello there!") for c in conversations))

    # Kill the node that leads the stream: a follower must take over, and every client
    # connected to the dead node must reconnect to another.
    leader = info.cluster.leader
    cluster.children[leader].kill()
    cluster.children[leader].proc.wait(10)
    second = await asyncio.gather(*(chat(client, c, "Are you still there?") for c in conversations))
    after = await stream_leader(js, name, not_this=leader)
    assert after != leader

    cluster.restart(leader)  # same store: it catches up from the others
    await replicas_current(js, name)
    third = await asyncio.gather(*(chat(client, c, "Welcome back.") for c in conversations))

    # Every reply is in the read models, each conversation in order, applied by the
    # projector of its partition.
    for conversation_id, replies in zip(conversations, zip(first, second, third)):
        messages = await client.messages_when(
            conversation_id, lambda ms: len(ms) == 6 and all(m["status"] == "complete" for m in ms), timeout=30,
        )
        assert [m["role"] for m in messages] == ["user", "assistant"] * 3
        assert [m["text"] for m in messages[0::2]] == ["Hello there!", "Are you still there?", "Welcome back."]
        assert [m["text"] for m in messages[1::2]] == [r["text"] for r in replies]
    recorder = read_model_recorder(cluster.settings.eventsourcing_env())
    try:
        positions = read_positions(recorder, PARTITIONS)
    finally:
        recorder.datastore.close()
    assert all(positions.applied[p] > 0 for p in range(PARTITIONS))

    # No process died on the way: the relay, projectors and workers rode the failover out.
    dead = [n for n, child in cluster.children.items() if not child.alive()]
    assert dead == []
    await client.close()



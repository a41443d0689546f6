"""A projector that died mid-batch: its successor starts again at the oldest unacked event.

On a stream of its own (the session stack's NATS server), a consumer is left as a killed
projector leaves it: some events acked, the next ones delivered and never acked. JetStream
would redeliver those only after the ack wait, behind newer events, and the projector's
position would pass over them; `rewind_if_interrupted` makes the consumer deliver them
next, in order."""

from __future__ import annotations

import uuid

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from chatbot.ops.launcher import Stack
from projections.projector import rewind_if_interrupted

pytestmark = pytest.mark.integration


async def fetch_all(sub, n: int) -> list:
    got: list = []
    while len(got) < n:
        got += await sub.fetch(n - len(got), timeout=5)
    return got


async def test_a_consumer_left_with_unacked_events_is_rewound_to_the_oldest_of_them(stack: Stack) -> None:
    nc = await nats.connect(stack.settings.nats_url)
    js = nc.jetstream()
    tag = uuid.uuid4().hex[:8]
    stream, subject, durable = f"REWIND{tag}", f"rewind{tag}", "projector-chat"
    await js.add_stream(name=stream, subjects=[f"{subject}.>"])

    def config() -> ConsumerConfig:
        return ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, ack_wait=30,
                              filter_subjects=[f"{subject}.>"])

    try:
        for i in range(10):
            await js.publish(f"{subject}.ev", str(i).encode(), stream=stream)
        assert await rewind_if_interrupted(js, stream, durable, config()) is None  # no consumer yet

        dead = await js.pull_subscribe(f"{subject}.>", durable=durable, stream=stream, config=config())
        for msg in await dead.fetch(3, timeout=5):
            await msg.ack()  # events 0-2: applied and acked
        unacked = await dead.fetch(4, timeout=5)  # events 3-6: delivered, then the projector died
        assert [int(m.data) for m in unacked] == [3, 4, 5, 6]
        await nc.flush()
        await dead.unsubscribe()

        assert await rewind_if_interrupted(js, stream, durable, config()) == 4  # the stream sequence of event 3
        info = await js.consumer_info(stream, durable)
        assert info.config.filter_subjects == [f"{subject}.>"] and info.config.ack_wait == 30
        successor = await js.pull_subscribe(f"{subject}.>", durable=durable, stream=stream, config=config())
        events = await fetch_all(successor, 7)
        assert [int(m.data) for m in events] == [3, 4, 5, 6, 7, 8, 9]  # the unacked first, in stream order

        # a consumer with everything acked (its projector stopped cleanly) is left alone
        for msg in events:
            await msg.ack_sync()
        await successor.unsubscribe()
        assert await rewind_if_interrupted(js, stream, durable, config()) is None
        assert (await js.consumer_info(stream, durable)).ack_floor.stream_seq == 10
    finally:
        await js.delete_stream(stream)
        await nc.close()

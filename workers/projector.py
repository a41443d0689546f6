"""The projector: applies the event stream to the read models.

A durable JetStream pull consumer delivers every event in stream order (which is the
event store's notification order, as the relay publishes it). Each event is applied with
its `Tracking(notification id)` in the same transaction as its rows, then acked; an event
redelivered after a crash finds its position recorded and changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os

import nats
from nats.aio.msg import Msg
from eventsourcing.persistence import IntegrityError, Tracking
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from chatbot.bootstrap import chat_application
from chatbot.config import Settings, load_settings
from chatbot.messaging import H_NOTIFICATION, decode_event, event_filter
from projections.chat import ChatProjection
from projections.readmodels import APPLICATION, read_model_recorder
from workers.runtime import setup_logging, stop_on_signals

log = logging.getLogger("projector")
DURABLE = "projector-chat"
BATCH = 256
PRIORITY_OFFSET = 10


async def main(settings: Settings) -> None:
    setup_logging("projector")
    # Read models are eventually consistent: on a busy machine the reply path goes first.
    os.nice(PRIORITY_OFFSET)
    stop = stop_on_signals()
    app = chat_application(settings)  # only its mapper: to decrypt and decode events
    recorder = read_model_recorder(settings.eventsourcing_env())
    projection = ChatProjection(recorder)
    position = recorder.position()
    nc = await nats.connect(settings.nats_url, max_reconnect_attempts=-1)
    js = nc.jetstream()
    sub = await js.pull_subscribe(
        event_filter(), durable=DURABLE, stream=settings.stream_name,
        config=ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
            ack_wait=30, max_ack_pending=BATCH * 4,
        ),
    )
    log.info("projecting from notification %d", position)

    def apply(messages: list[Msg], position: int) -> int:
        for msg in messages:
            headers = msg.headers or {}
            notification_id = int(headers[H_NOTIFICATION])
            if notification_id <= position:
                continue  # already applied: a redelivery or a republished event
            event = decode_event(app.mapper, headers, msg.data)
            try:
                projection.process_event(event, Tracking(APPLICATION, notification_id))
            except IntegrityError:
                pass  # applied before (a replay): the tracking row says so
            position = notification_id
        return position

    while not stop.is_set():
        try:
            messages = await sub.fetch(BATCH, timeout=1.0)
        except TimeoutError:  # nats-py raises its own subclass or the builtin, depending on where it timed out
            continue
        position = await asyncio.to_thread(apply, messages, position)
        for msg in messages:
            await msg.ack()
    await nc.drain()
    recorder.datastore.close()
    app.close()
    log.info("stopped at notification %d", position)


def run() -> None:
    asyncio.run(main(load_settings()))

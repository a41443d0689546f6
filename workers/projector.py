"""The projector: applies the event stream to the read models.

A durable JetStream pull consumer delivers every event in stream order (which is the
event store's notification order, as the relay publishes it). Each event is applied with
its `Tracking(notification id)` in the same transaction as its rows, then acked; an event
redelivered after a crash finds its position recorded and changes nothing.
"""

from __future__ import annotations

import asyncio

import nats
from eventsourcing.persistence import IntegrityError, Tracking
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from chatbot.bootstrap import chat_application
from chatbot.config import Settings, load_settings
from chatbot.messaging import H_NOTIFICATION, decode_event, event_filter
from projections.chat import ChatProjection
from projections.readmodels import APPLICATION, read_model_recorder
from workers.runtime import setup_logging, stop_on_signals

log = setup_logging("projector")
DURABLE = "projector-chat"
BATCH = 256


async def main(settings: Settings) -> None:
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
    while not stop.is_set():
        try:
            messages = await sub.fetch(BATCH, timeout=1.0)
        except TimeoutError:  # nats-py raises its own subclass or the builtin, depending on where it timed out
            continue
        for msg in messages:
            headers = msg.headers or {}
            notification_id = int(headers[H_NOTIFICATION])
            if notification_id > position:
                event = decode_event(app.mapper, headers, msg.data)
                try:
                    await asyncio.to_thread(
                        projection.process_event, event, Tracking(APPLICATION, notification_id)
                    )
                except IntegrityError:
                    pass  # applied before (a replay): the tracking row says so
                position = notification_id
            await msg.ack()
    await nc.drain()
    recorder.datastore.close()
    app.close()
    log.info("stopped at notification %d", position)


def run() -> None:
    asyncio.run(main(load_settings()))

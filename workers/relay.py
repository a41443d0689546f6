"""The relay: publishes every stored event to JetStream, in notification order.

It tails the event store's notification log and wakes on the `NOTIFY` that the
`eventsourcing` recorder sends with every insert, so an event reaches the broker about a
millisecond after its commit. Each message carries `Nats-Msg-Id` = the event id, so a
relay that crashed between publishing and recording its position republishes harmlessly:
JetStream drops the duplicate. One relay is active at a time (a PostgreSQL advisory lock);
others wait as standbys.
"""

from __future__ import annotations

import asyncio
import logging

import nats
import psycopg
from nats.errors import Error as NatsError

from chatbot.bootstrap import chat_application
from chatbot.config import Settings, load_settings
from chatbot.messaging import ensure_stream, event_headers, event_subject
from workers.runtime import setup_logging, stop_on_signals

log = logging.getLogger("relay")
LOCK_KEY = 0x636861747265  # "chatre": one active relay
BATCH = 500
IDLE_WAIT_S = 1.0
RETRY_S = 1.0


async def main(settings: Settings) -> None:
    setup_logging("relay")
    stop = stop_on_signals()
    app = chat_application(settings)
    nc = await nats.connect(settings.nats_servers, max_reconnect_attempts=-1)
    js = nc.jetstream()
    await ensure_stream(js, settings.stream_name, settings.stream_replicas)
    conn = await psycopg.AsyncConnection.connect(settings.pg_conninfo, autocommit=True)
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS relay_position (name text PRIMARY KEY, notification_id bigint NOT NULL)"
    )
    log.info("waiting for the relay lock")
    await conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
    await conn.execute(f"LISTEN {app.recorder.channel_name}")  # type: ignore[attr-defined]
    row = await (await conn.execute("SELECT notification_id FROM relay_position WHERE name = 'chat'")).fetchone()
    position = row[0] if row else 0
    log.info("relaying from notification %d", position)
    while not stop.is_set():
        notifications = await asyncio.to_thread(
            app.recorder.select_notifications, position, BATCH, inclusive_of_start=False
        )
        if notifications:
            # Pipelined: all go out in order on one connection, then the acks are awaited
            # together, so a batch costs about one fsync round trip instead of one each.
            try:
                await asyncio.gather(*(
                    js.publish(
                        event_subject(n, settings.partitions), n.state,
                        stream=settings.stream_name, headers=event_headers(n),
                    )
                    for n in notifications
                ))
            except (TimeoutError, NatsError) as e:
                # A NATS node died or the stream's leader is moving: publish the batch again
                # (those that arrived are dropped as duplicates by their Nats-Msg-Id).
                log.warning("publishing %d events: %r; retrying", len(notifications), e)
                await asyncio.sleep(RETRY_S)
                continue
            position = notifications[-1].id
            await conn.execute(
                "INSERT INTO relay_position VALUES ('chat', %s)"
                " ON CONFLICT (name) DO UPDATE SET notification_id = EXCLUDED.notification_id",
                (position,),
            )
            continue
        # Nothing new: sleep until the next insert's NOTIFY (or a timeout, as a safety net).
        async for _ in conn.notifies(timeout=IDLE_WAIT_S, stop_after=1):
            break
    await conn.close()
    await nc.drain()
    app.close()
    log.info("stopped at notification %d", position)


def run() -> None:
    asyncio.run(main(load_settings()))

"""The relay: publishes every stored event to JetStream, in notification order.

It tails the event store's notification log (an `EventLog`, chatbot/eventstore/log.py: the
relay needs nothing else of the event store) and wakes on the `NOTIFY` that the
`eventsourcing` recorder sends with every insert, so an event reaches the broker about a
millisecond after its commit. One relay is active at a time (a PostgreSQL advisory lock);
others wait as standbys.

Each batch goes out as one JetStream atomic batch: its messages stream out pipelined on
one connection and the last one commits them, so the stream stores all of them, in order,
or none. A batch that fails in the middle (a NATS node dies, the stream's leader moves)
leaves nothing behind it, so a later event can never land before an earlier one, which
would break a conversation's order for every consumer. Each message also carries
`Nats-Msg-Id` = the event id: a batch that was stored although its acknowledgement was
lost, or that a relay killed before recording its position sends again, is refused as a
duplicate, and the relay then reads where the stream really ends (its last message names
its notification id) and goes on from there. So the stream is always the notification
log's prefix: every event once, in order.

The events of a message's path carry its trace context in their metadata: while spans are
exported, the relay reads it, makes a `relay publish` span per such event and sends that
span's context on in the message's headers (chatbot/runtime/tracing.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import nats
import psycopg
from eventsourcing.persistence import Notification
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

from chatbot.bus.messaging import (
    H_NOTIFICATION,
    ensure_stream,
    event_headers,
    event_name,
    event_subject,
    partition_of,
)
from chatbot.eventstore.application import event_log
from chatbot.eventstore.log import EventLog
from chatbot.runtime.config import Settings, load_settings
from chatbot.runtime.metrics import (
    RELAY_LAG_EVENTS,
    RELAY_LAG_SECONDS,
    PartitionLag,
    serve,
)
from chatbot.runtime.process import setup_logging, stop_on_signals
from chatbot.runtime.tracing import (
    TRACED_EVENTS,
    context_of,
    exporting,
    remote_spans,
    setup_tracing,
)
from chatbot.runtime.tracing import shutdown as shutdown_tracing

log = logging.getLogger("relay")
LOCK_KEY = 0x636861747265  # "chatre": one active relay
BATCH = 500  # notifications read at a time
ATOMIC_MAX = 1000  # messages in one atomic batch: the server's limit
ATOMIC_MAX_BYTES = 4 << 20  # keeps a batch of large events (imports) well inside the server's buffers
COMMIT_TIMEOUT_S = 10.0
IDLE_WAIT_S = 1.0
RETRY_S = 1.0
# The position is a hint for restarts and `projections status`: a restarted relay goes on
# from the stream's last message anyway. So under load it is written at most this often
# (one commit, and its fsync, a second instead of one a batch), and whenever the relay
# catches up.
RECORD_EVERY_S = 1.0


class BatchRefused(Exception):
    """JetStream refused an atomic batch: nothing of it was stored."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"{description} (error {code})")
        self.code = code


def atomic_batches(notifications: Sequence[Notification]) -> Iterator[Sequence[Notification]]:
    """`notifications` in order, cut into batches the server accepts whole."""
    start, size = 0, 0
    for i, n in enumerate(notifications):
        if i > start and (i - start >= ATOMIC_MAX or size + len(n.state) > ATOMIC_MAX_BYTES):
            yield notifications[start:i]
            start, size = i, 0
        size += len(n.state)
    if start < len(notifications):
        yield notifications[start:]


async def publish_atomic(nc: Client, notifications: Sequence[Notification], partitions: int,
                         traces: Mapping[int, dict[str, str]] | None = None) -> int:
    """Publish `notifications` as one atomic batch; returns the stream sequence of its last
    message. Raises BatchRefused (nothing stored), or a NATS error or TimeoutError (stored
    whole or not at all: unknown until the stream is read). `traces`: the trace context
    headers of the events that have one, by notification id."""
    batch_id = uuid.uuid4().hex
    last = len(notifications)
    for i, n in enumerate(notifications, 1):
        headers = {**event_headers(n), **(traces or {}).get(n.id, {}),
                   "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(i)}
        subject = event_subject(n, partitions)
        if i < last:
            await nc.publish(subject, n.state, headers=headers)
            continue
        headers["Nats-Batch-Commit"] = "1"
        reply = await nc.request(subject, n.state, headers=headers, timeout=COMMIT_TIMEOUT_S)
        ack = json.loads(reply.data)
        if "error" in ack:
            raise BatchRefused(ack["error"].get("err_code", 0), ack["error"].get("description", "refused"))
        return int(ack["seq"])
    raise ValueError("an atomic batch needs at least one message")


def traced_events(events: EventLog, notifications: Sequence[Notification]) -> dict[int, Context | None]:
    """The trace context each traced event was recorded in (its metadata, chatbot/runtime/tracing.py),
    by notification id: only those events are decrypted, and only while spans are exported.
    Blocking (a user's key may be read): runs in a thread."""
    if not exporting():
        return {}
    parents: dict[int, Context | None] = {}
    for n in notifications:
        if event_name(n.topic) in TRACED_EVENTS:
            try:
                parents[n.id] = context_of(events.decode(n))
            except Exception:  # noqa: BLE001 - an erased user's event, say: relayed untraced
                parents[n.id] = None
    return parents


async def relayed_through(js: JetStreamContext, stream: str) -> int:
    """The notification id of the stream's last message: every event up to it is on the
    stream (the relay is its only publisher, and publishes whole batches in order).
    0 when the stream is empty or its last message is not an event."""
    info = await js.stream_info(stream)
    if not info.state.last_seq:
        return 0
    try:
        message = await js.get_msg(stream, seq=info.state.last_seq)
    except NotFoundError:  # removed between the two calls (the stream's age limit)
        return 0
    value = (message.headers or {}).get(H_NOTIFICATION)
    return int(value) if value and value.isdigit() else 0


async def stream_end(js: JetStreamContext, stream: str, events: EventLog) -> int:
    """Where the stream ends, as a notification id to go on from; 0 (trust the recorded
    position) when the stream is ahead of the event store: the database was restored from
    a backup while the stream kept its store, and its notification ids start again below
    the stream's. Events would be skipped; an operator must look at it."""
    through = await relayed_through(js, stream)
    head = await asyncio.to_thread(events.head)
    if through > head:
        log.error("the stream %s ends at notification %d, beyond the event store's newest (%d): was the "
                  "database restored? Going on from the recorded position; duplicates are refused by event id",
                  stream, through, head)
        return 0
    return through


async def record(conn: psycopg.AsyncConnection[Any], position: int) -> int:
    await conn.execute(
        "INSERT INTO relay_position VALUES ('chat', %s)"
        " ON CONFLICT (name) DO UPDATE SET notification_id = EXCLUDED.notification_id",
        (position,),
    )
    return position


async def observe_lag(lag: PartitionLag, events: EventLog, position: int, notifications: Sequence[Notification],
                      partitions: int) -> None:
    """Everything after the position is behind; a full read may not be all of it, so
    then the event store's newest notification id says how much is."""
    if not notifications:
        lag.update(0, {})
        return
    head = notifications[-1].id
    if len(notifications) >= BATCH:
        head = max(head, await asyncio.to_thread(events.head))
    lag.update(head - position, Counter(partition_of(n.originator_id, partitions) for n in notifications))


async def main(settings: Settings) -> None:
    setup_logging("relay", settings.log_format)
    setup_tracing("relay")
    serve(settings.metrics_port, settings.metrics_host)
    lag = PartitionLag(RELAY_LAG_EVENTS, RELAY_LAG_SECONDS, range(settings.partitions))
    stop = stop_on_signals()
    events = event_log(settings)  # the notification log: all the relay reads of the event store
    nc = await nats.connect(settings.nats_servers, max_reconnect_attempts=-1)
    js = nc.jetstream()
    await ensure_stream(js, settings.stream_name, settings.stream_replicas)
    conn = await psycopg.AsyncConnection.connect(settings.pg_conninfo, autocommit=True)
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS relay_position (name text PRIMARY KEY, notification_id bigint NOT NULL)"
    )
    log.info("waiting for the relay lock")
    await conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
    await conn.execute(f"LISTEN {events.channel}")
    row = await (await conn.execute("SELECT notification_id FROM relay_position WHERE name = 'chat'")).fetchone()
    recorded = row[0] if row else 0
    # A relay that died after publishing and before recording its position: go on from
    # where the stream ends instead of sending that batch again.
    position = max(recorded, await stream_end(js, settings.stream_name, events))
    log.info("relaying from notification %d (recorded: %d)", position, recorded)
    recorded_at = time.monotonic()
    while not stop.is_set():
        notifications = await asyncio.to_thread(events.read, position, BATCH)
        await observe_lag(lag, events, position, notifications, settings.partitions)
        if notifications:
            traced = await asyncio.to_thread(traced_events, events, notifications) if exporting() else {}
            try:
                for batch in atomic_batches(notifications):
                    parents = {n.id: traced[n.id] for n in batch if n.id in traced}
                    with remote_spans("relay publish", SpanKind.PRODUCER, parents,
                                      {"messaging.system": "nats", "messaging.batch.message_count": len(batch)}) as traces:
                        await publish_atomic(nc, batch, settings.partitions, traces)
                    position = batch[-1].id
            except (BatchRefused, TimeoutError, NatsError) as e:
                # A NATS node died, the stream's leader is moving, or the batch was stored
                # before (its ack lost): nothing of a refused batch was stored, so read
                # where the stream ends and send again from there.
                log.warning("publishing events after notification %d: %r; retrying", position, e)
                await asyncio.sleep(RETRY_S)
                try:
                    position = max(position, await stream_end(js, settings.stream_name, events))
                except (TimeoutError, NatsError) as e:
                    log.warning("reading where the stream ends: %r", e)
                continue
            if position > recorded and time.monotonic() - recorded_at >= RECORD_EVERY_S:
                recorded, recorded_at = await record(conn, position), time.monotonic()
            continue
        if position > recorded:  # caught up: `chatbot projections status` shows no lag
            recorded, recorded_at = await record(conn, position), time.monotonic()
        # Nothing new: sleep until the next insert's NOTIFY (or a timeout, as a safety net).
        async for _ in conn.notifies(timeout=IDLE_WAIT_S, stop_after=1):
            break
    if position > recorded:
        await record(conn, position)
    await conn.close()
    await nc.drain()
    events.close()
    log.info("stopped at notification %d", position)
    shutdown_tracing()


def run() -> None:
    asyncio.run(main(load_settings()))

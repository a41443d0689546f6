"""The projector: applies the event stream to the read models.

`ChatProjection` says what each event does to the read models' rows (projections/readmodels.py
holds the tables and their SQL); the rebuild (projections/rebuild.py) replays the event
store's log through it into fresh tables. The rest of this module is the process that
applies the stream as it comes.

A durable JetStream pull consumer delivers every event in stream order (which is the
event store's notification order, as the relay publishes it). Each fetched batch is applied
in one transaction with its rows and its newest `Tracking(notification id)` (per
partition), then acked; an event redelivered after a crash is at or before the recorded
position and changes nothing (`apply_batch`).

With `CHATBOT_PARTITIONS` > 1 positions are kept per partition (projections/positions.py),
and `CHATBOT_CONSUME_PARTITIONS` makes this projector read only those partitions, through
its own durable consumer (`projector-chat-p0-3`): several projectors then share the load,
each applying its partitions in stream order, so every conversation's events stay in order.

A projector that dies mid-batch (killed, or PostgreSQL gone) leaves events delivered and
never acked. JetStream would give them back only after the ack wait, behind newer events
that its successor fetches at once, and the position (the newest event applied) would then
pass over them. So a projector starting on a consumer that holds unacked events first
rewinds it to the oldest of them (`rewind_if_interrupted`): the events it applied before
are skipped by the position, the rest are applied in stream order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections import Counter
from functools import singledispatchmethod
from typing import Any
from uuid import UUID

import nats
from eventsourcing.persistence import IntegrityError, OperationalError, Tracking
from eventsourcing.projection import Projection
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from opentelemetry.trace import SpanKind
from psycopg.errors import DeadlockDetected, SerializationFailure, TransactionRollback

from chatbot.bus.messaging import (
    H_NOTIFICATION,
    H_ORIGINATOR,
    consumer_filters,
    consumer_name,
    decode_event,
    event_filter,
    partition_of,
)
from chatbot.eventstore.application import event_log
from chatbot.eventstore.keys import DataErased, PostgresKeyStore, Unreadable, key_owner
from chatbot.eventstore.log import EventLog
from chatbot.runtime.config import Settings, load_settings
from chatbot.runtime.metrics import (
    PROJECTOR_LAG_EVENTS,
    PROJECTOR_LAG_SECONDS,
    REDELIVERIES,
    PartitionLag,
    serve,
)
from chatbot.runtime.process import setup_logging, stop_on_signals
from chatbot.runtime.tracing import message_parents, remote_spans, setup_tracing
from chatbot.runtime.tracing import shutdown as shutdown_tracing
from domain.conversation import Conversation
from domain.persona import Persona
from domain.user import User
from projections.positions import PartitionPositions, read_positions
from projections.readmodels import ReadModelRecorder, read_model_recorder

log = logging.getLogger("projector")
DURABLE = "projector-chat"
BATCH = 256
LINGER_S = 0.02  # after a batch that was not full, before the next fetch
BATCH_ATTEMPTS = 3  # a batch chosen as a deadlock's victim is tried this often, then event by event
PARTITION_LOCK = 0x70726F6A  # "proj": the advisory locks' first key, one lock per partition
ROLLED_BACK = (DeadlockDetected, SerializationFailure, TransactionRollback)  # worth trying again
PRIORITY_OFFSET = 10



class ChatProjection(Projection[ReadModelRecorder]):
    name = "chat"

    @singledispatchmethod
    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        self.view.skip(tracking)  # events no read model needs still move the position

    @process_event.register
    def _(self, e: Persona.Created, tracking: Tracking) -> None:
        self.view.upsert_persona(tracking, {
            "id": e.originator_id, "slug": e.slug, "name": e.name, "description": e.description,
            "greeting": e.greeting, "model": e.model, "version": e.originator_version,
            "updated_at": e.timestamp, "owner_id": getattr(e, "owner_id", None),
            "visibility": getattr(e, "visibility", "public"), "avatar": getattr(e, "avatar", ""),
        })

    @process_event.register
    def _(self, e: Persona.Edited, tracking: Tracking) -> None:
        self.view.update_persona(tracking, e.originator_id, e.originator_version, e.timestamp, e.changes)

    @process_event.register
    def _(self, e: Persona.Retired, tracking: Tracking) -> None:
        self.view.update_persona(tracking, e.originator_id, e.originator_version, e.timestamp, {"retired": True})

    @process_event.register
    def _(self, e: Conversation.Started, tracking: Tracking) -> None:
        self.view.insert_conversation(tracking, {
            "id": e.originator_id, "owner_id": e.owner_id, "persona_id": e.persona_id,
            "title": e.title, "at": e.timestamp,
        })

    @process_event.register
    def _(self, e: Conversation.UserMessagePosted, tracking: Tracking) -> None:
        self.view.add_message(tracking, {
            "id": e.message_id, "conversation_id": e.originator_id, "role": "user",
            "text": e.text, "status": "complete", "reply_to": None, "parent_id": e.parent_id, "at": e.timestamp,
        })

    @process_event.register
    def _(self, e: Conversation.TurnsImported, tracking: Tracking) -> None:
        # a chain, each turn the parent of the next (turns only go into a new conversation)
        parents = [None] + [t["id"] for t in e.turns[:-1]]
        nodes = [{**t, "parent_id": parent} for t, parent in zip(e.turns, parents)]
        current = nodes[-1]["id"] if nodes else None
        self.view.import_tree(tracking, e.originator_id, nodes, current, None, e.timestamp)

    @process_event.register
    def _(self, e: Conversation.ReplyRequested, tracking: Tracking) -> None:
        self.view.add_message(tracking, {
            "id": e.reply_id, "conversation_id": e.originator_id, "role": "assistant",
            "text": "", "status": "pending", "reply_to": e.message_id, "parent_id": e.message_id,
            "at": e.timestamp,
        })

    @process_event.register
    def _(self, e: Conversation.BranchSelected, tracking: Tracking) -> None:
        self.view.update_conversation(tracking, e.originator_id, {"current_leaf": e.leaf_id})

    @process_event.register
    def _(self, e: Conversation.Titled, tracking: Tracking) -> None:
        self.view.update_conversation(tracking, e.originator_id, {"title": e.title})

    @process_event.register
    def _(self, e: Conversation.Renamed, tracking: Tracking) -> None:
        self.view.update_conversation(tracking, e.originator_id, {"title": e.title})

    @process_event.register
    def _(self, e: Conversation.ArchiveSet, tracking: Tracking) -> None:
        self.view.update_conversation(tracking, e.originator_id, {"archived": e.archived})

    @process_event.register
    def _(self, e: Conversation.PinSet, tracking: Tracking) -> None:
        self.view.update_conversation(tracking, e.originator_id, {"pinned": e.pinned})

    @process_event.register
    def _(self, e: Conversation.TreeImported, tracking: Tracking) -> None:
        self.view.import_tree(tracking, e.originator_id, e.nodes, e.current, e.title, e.timestamp)

    @process_event.register
    def _(self, e: Conversation.Shared, tracking: Tracking) -> None:
        self.view.add_share(tracking, {
            "id": e.share_id, "conversation_id": e.originator_id, "title": e.title,
            "messages": e.messages, "at": e.timestamp,
        })

    @process_event.register
    def _(self, e: Conversation.ShareRevoked, tracking: Tracking) -> None:
        self.view.revoke_share(tracking, e.share_id)

    @process_event.register
    def _(self, e: Conversation.RetentionSet, tracking: Tracking) -> None:
        self.view.update_conversation(tracking, e.originator_id, {"expires_at": e.expires_at})

    @process_event.register
    def _(self, e: Conversation.ListedApart, tracking: Tracking) -> None:
        self.view.update_conversation(tracking, e.originator_id, {"via_api": True})

    @process_event.register
    def _(self, e: Conversation.Discarded, tracking: Tracking) -> None:
        self.view.delete_conversation(tracking, e.originator_id)

    @process_event.register
    def _(self, e: Conversation.Expired, tracking: Tracking) -> None:
        self.view.delete_conversation(tracking, e.originator_id)

    @process_event.register
    def _(self, e: Conversation.Deleted, tracking: Tracking) -> None:
        self.view.delete_conversation(tracking, e.originator_id)

    @process_event.register
    def _(self, e: Conversation.ReplyCompleted, tracking: Tracking) -> None:
        self.view.finish_reply(tracking, {
            "id": e.reply_id, "conversation_id": e.originator_id, "text": e.text,
            "status": "complete", "finish_reason": e.finish_reason,
            "model": f"{e.model_name}/{e.model_version}", "at": e.timestamp,
            "tokens": e.prompt_tokens + e.completion_tokens,
        })

    @process_event.register
    def _(self, e: Conversation.FeedbackGiven, tracking: Tracking) -> None:
        self.view.rate_reply(tracking, e.originator_id, e.reply_id, e.rating, e.comment)

    @process_event.register
    def _(self, e: Conversation.FeedbackCleared, tracking: Tracking) -> None:
        self.view.rate_reply(tracking, e.originator_id, e.reply_id, None, "")

    @process_event.register
    def _(self, e: Conversation.ReplyFailed, tracking: Tracking) -> None:
        self.view.finish_reply(tracking, {
            "id": e.reply_id, "conversation_id": e.originator_id, "text": "",
            "status": "failed", "finish_reason": "error", "model": None, "at": e.timestamp,
        })

    @process_event.register
    def _(self, e: User.Erased, tracking: Tracking) -> None:
        self.view.erase_user(tracking, e.originator_id)


async def rewind_if_lost(js: JetStreamContext, stream: str, durable: str, config: ConsumerConfig) -> bool:
    """While idle, or after a NATS error, this projector holds no event unacked: any the
    consumer still counts as delivered were lost on the way (a node died with the fetch
    response), and would come back only after the ack wait, behind newer events that the
    position would then pass over. Rewind to the oldest of them. A rewind that only races
    the last acks is harmless: events already applied are skipped by the position."""
    try:
        rewound = await rewind_if_interrupted(js, stream, durable, config)
    except (NatsError, TimeoutError) as e:
        log.warning("checking the consumer for lost deliveries: %s", e)
        return False
    if rewound is not None:
        log.warning("deliveries were lost: consuming again from stream sequence %d", rewound)
    return rewound is not None


async def rewind_if_interrupted(js: JetStreamContext, stream: str, durable: str, config: ConsumerConfig) -> int | None:
    """If the durable consumer holds events delivered and never acked (its projector died
    mid-batch), make it again from the oldest of them, so they come next and in order;
    returns that stream sequence, or None when nothing was interrupted. One projector
    runs per consumer (per partition set), so no live process loses its messages."""
    try:
        info = await js.consumer_info(stream, durable)
    except NotFoundError:
        return None
    if not info.num_ack_pending:
        return None
    start = info.ack_floor.stream_seq + 1  # every event before it was acked
    await js.delete_consumer(stream, durable)
    await js.add_consumer(stream, config=dataclasses.replace(
        config, name=durable, durable_name=durable, filter_subject=None if config.filter_subjects else event_filter(),
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start,
    ))
    return start


def observe_batch(lag: PartitionLag, messages: list[Msg], partitions: int) -> None:
    """After a batch is applied: what the consumer has not delivered yet is behind
    (JetStream counts it, `num_pending`), split over the partitions as this batch was; the
    newest event applied on a partition went on the stream before any still behind it, so
    its time bounds how long they have waited. Redeliveries are counted here too."""
    sample: Counter[int] = Counter()
    newest: dict[int, float] = {}
    for msg in messages:
        partition = partition_of((msg.headers or {}).get(H_ORIGINATOR, ""), partitions)
        sample[partition] += 1
        if msg.metadata:
            newest[partition] = msg.metadata.timestamp.timestamp()
            if msg.metadata.num_delivered > 1:
                REDELIVERIES.labels(consumer=DURABLE).inc()
    last = messages[-1].metadata
    lag.update(last.num_pending if last else 0, sample, newest)


async def main(settings: Settings) -> None:
    setup_logging("projector", settings.log_format)
    setup_tracing("projector")
    serve(settings.metrics_port, settings.metrics_host)
    # Read models are eventually consistent: on a busy machine the reply path goes first.
    os.nice(PRIORITY_OFFSET)
    stop = stop_on_signals()
    # The event log decrypts and decodes events; its key store also seals the read models' text.
    events = event_log(settings)
    recorder = read_model_recorder(settings.eventsourcing_env(), keys=events.keys)
    projection = ChatProjection(recorder)
    positions = read_positions(recorder, settings.partitions)
    chosen = settings.consume_partitions
    nc = await nats.connect(settings.nats_servers, max_reconnect_attempts=-1)
    js = nc.jetstream()
    durable = consumer_name(DURABLE, chosen)
    lag = PartitionLag(PROJECTOR_LAG_EVENTS, PROJECTOR_LAG_SECONDS, chosen or range(settings.partitions))

    def config() -> ConsumerConfig:
        return ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
            ack_wait=30, max_ack_pending=BATCH * 4, filter_subjects=consumer_filters(">", chosen),
        )

    rewound = await rewind_if_interrupted(js, settings.stream_name, durable, config())
    if rewound is not None:
        log.info("the last projector stopped mid-batch: consuming again from stream sequence %d", rewound)
    sub = await js.pull_subscribe(event_filter(), durable=durable, stream=settings.stream_name, config=config())
    log.info("projecting partitions %s of %d from notification %d",
             ",".join(map(str, chosen)) or "all", settings.partitions, positions.head)

    expected = 0  # the consumer sequence the next delivery should carry (0: not known yet)
    while not stop.is_set():
        try:
            messages = await sub.fetch(BATCH, timeout=1.0)
        except TimeoutError:  # nats-py raises its own subclass or the builtin, depending on where it timed out
            lag.update(0, {})  # nothing waiting: caught up
            if await rewind_if_lost(js, settings.stream_name, durable, config()):
                expected = 0
            continue
        except NatsError as e:  # a NATS node or the consumer's leader is changing: ask again
            log.warning("fetching events: %s; retrying", e)
            await asyncio.sleep(1.0)
            if await rewind_if_lost(js, settings.stream_name, durable, config()):
                expected = 0
            continue
        if not messages:  # a fetch can come back empty while a node or the consumer's leader changes
            await asyncio.sleep(0.1)
            continue
        # Every delivery takes the next consumer sequence: a jump means deliveries were lost
        # on the way (a node died with a fetch response). Applying this batch would move the
        # position past them, so rewind first; the batch comes again, after them, in order.
        first = messages[0].metadata.sequence.consumer if messages[0].metadata else 0
        if expected and first != expected:
            log.warning("deliveries %d to %d were lost: rewinding", expected, first - 1)
            if await rewind_if_lost(js, settings.stream_name, durable, config()):
                expected = 0
                continue
        last = messages[-1].metadata.sequence.consumer if messages[-1].metadata else 0
        expected = last + 1 if last else 0
        # a `projector apply` span for each event that carries a trace (chatbot/runtime/tracing.py)
        with remote_spans("projector apply", SpanKind.CONSUMER, message_parents(m.headers for m in messages),
                          {"messaging.system": "nats", "messaging.batch.message_count": len(messages)}):
            positions = await asyncio.to_thread(apply_batch, projection, events, messages, positions)
            for msg in messages:
                await msg.ack()
        observe_batch(lag, messages, settings.partitions)
        if len(messages) < BATCH:
            # Under a steady trickle every event would be a batch of its own (a transaction,
            # a commit, acks): wait a moment so the next batch gathers what arrives meanwhile.
            # The read models are eventually consistent; this keeps them LINGER_S behind.
            await asyncio.sleep(LINGER_S)
    await nc.drain()
    recorder.datastore.close()
    events.close()
    log.info("stopped at notification %d", positions.head)
    shutdown_tracing()


def project(projection: ChatProjection, events: EventLog, msg: Msg, headers: dict[str, str], erased: set[UUID],
            positions: PartitionPositions) -> None:
    notification_id, originator = int(headers[H_NOTIFICATION]), headers[H_ORIGINATOR]
    owner = key_owner(msg.data)
    try:
        event = Unreadable(originator) if owner in erased else decode_event(events.mapper, headers, msg.data)
    except DataErased:  # its user was erased: there is nothing of it to project
        event = Unreadable(originator)
    projection.process_event(event, positions.tracking(originator, notification_id))


def apply_batch(projection: ChatProjection, events: EventLog, messages: list[Msg],
                positions: PartitionPositions) -> PartitionPositions:
    """Apply a fetched batch in one transaction (one commit, statements pipelined) and
    return the positions it leaves.

    - The transaction takes an advisory lock per partition it writes and reads the
      positions again under it: two projectors that read one partition by mistake take
      turns, and the second skips what the first applied (positions are written once per
      batch, so the tracking table alone would not refuse an event inside a batch).
    - It holds a share lock on the key rows of the users whose events it applies
      (`PostgresKeyStore.share_lock`, chatbot/eventstore/keys.py): an
      erasure (which nulls the key row) waits for this commit, then the `Erased` event
      deletes these rows too; or it went first, and this batch sees the key gone and
      writes nothing of theirs. Without the lock a projector of other partitions, still
      holding the key in its cache, could write an erased user's rows back.
    - Projectors of different partitions share rows (a user's usage of the day): a batch
      chosen as a deadlock's victim is tried again, then event by event."""
    # An event at or before the positions (a redelivery, even one within this very batch)
    # is not applied again.
    after = dataclasses.replace(positions, applied=dict(positions.applied))
    todo = []
    for msg in messages:
        headers = msg.headers or {}
        originator, notification_id = headers[H_ORIGINATOR], int(headers[H_NOTIFICATION])
        if not after.is_applied(originator, notification_id):
            after.record(originator, notification_id)
            todo.append((msg, headers))
    if not todo:
        return positions
    recorder = projection.view
    names = sorted({positions.tracking(h[H_ORIGINATOR], 0).application_name for _, h in todo})
    for attempt in range(1, BATCH_ATTEMPTS + 1):
        try:
            with recorder.datastore.transaction(commit=True) as curs:
                curs.execute(
                    "SELECT pg_advisory_xact_lock(%s, hashtext(name)) FROM unnest(%s::text[]) AS name ORDER BY name",
                    (PARTITION_LOCK, names),
                )
                current = read_positions(recorder, positions.partitions, curs)
                mine = [(m, h) for m, h in todo if not current.is_applied(h[H_ORIGINATOR], int(h[H_NOTIFICATION]))]
                owners = sorted({o for m, _ in mine if (o := key_owner(m.data)) is not None})
                erased = PostgresKeyStore.share_lock(curs, owners)
                with recorder.batch(curs):
                    for msg, headers in mine:
                        project(projection, events, msg, headers, erased, current)
            return dataclasses.replace(after, applied={
                p: max(after.applied[p], current.applied[p]) for p in after.applied
            })
        except IntegrityError:
            break  # a row refused (applied before by other means): event by event below
        except OperationalError as e:
            if not isinstance(e.__cause__, ROLLED_BACK):
                raise  # PostgreSQL is away: the process restarts and rewinds its consumer
            if attempt == BATCH_ATTEMPTS:
                break  # a deadlock's victim again and again: event by event below
            log.info("batch of %d events: %s; trying again", len(todo), type(e.__cause__).__name__)
            time.sleep(0.05 * attempt)
    # Each event in its own transaction: a refused one is skipped (its tracking row says it
    # was applied), and one event locks one usage row, so no deadlock.
    positions = read_positions(recorder, positions.partitions)
    for msg, headers in todo:
        notification_id, originator = int(headers[H_NOTIFICATION]), headers[H_ORIGINATOR]
        if positions.is_applied(originator, notification_id):
            continue
        try:
            with recorder.datastore.transaction(commit=True) as curs:
                erased = PostgresKeyStore.share_lock(curs, [o] if (o := key_owner(msg.data)) else [])
                with recorder.batch(curs):
                    project(projection, events, msg, headers, erased, positions)
        except IntegrityError:
            pass  # applied before: the tracking row says so
        positions.record(originator, notification_id)
    return positions


def run() -> None:
    asyncio.run(main(load_settings()))

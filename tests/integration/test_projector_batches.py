"""The projector applies each fetched batch in one transaction, with one position per
partition written at its end. So the tracking table no longer refuses an event applied
before: `apply_batch` itself must skip a redelivery, even one in the same batch as its
first delivery (a consumer rewound while deliveries were under way), or a reply's tokens
would count twice in the usage table.

Real events (encrypted, from the session stack's event store), applied by `apply_batch`
into read-model tables of the test's own (prefix `tp_`) in the stack's PostgreSQL."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from chatbot.bus.messaging import H_TOPIC, event_headers
from chatbot.ops.launcher import Stack
from projections.positions import read_positions
from projections.projector import ChatProjection, apply_batch
from projections.readmodels import ReadModelRecorder

pytestmark = pytest.mark.integration
OUTCOME = dict(finish_reason="stop", prompt_tokens=3, completion_tokens=2, ttft_ms=1.0, duration_ms=2.0,
               model_name="chat", model_version="1")


@dataclass
class Delivery:
    """What `apply_batch` reads of a JetStream message."""

    headers: dict[str, str]
    data: bytes


def usage(recorder: ReadModelRecorder, user_id: uuid.UUID) -> tuple[int, int]:
    with recorder.datastore.get_connection() as conn:
        row = conn.execute("SELECT sum(tokens) AS tokens, sum(replies) AS replies FROM tp_usage WHERE user_id = %s",
                           (user_id,)).fetchone()
    return int(row["tokens"] or 0), int(row["replies"] or 0)


def make_recorder(stack: Stack, table: str) -> ReadModelRecorder:
    """Read-model tables `tp_*` with the tracking table `table`, on a pool of its own."""
    from eventsourcing.postgres import PostgresFactory
    from eventsourcing.utils import Environment

    factory = PostgresFactory(Environment(name="tp", env=stack.settings.eventsourcing_env()))
    recorder = ReadModelRecorder(datastore=factory.datastore, tracking_table_name=table, prefix="tp_")
    recorder.create_table()
    return recorder


def fresh_recorder(stack: Stack) -> ReadModelRecorder:
    recorder = make_recorder(stack, f"tp_tracking_{uuid.uuid4().hex[:8]}")
    with recorder.datastore.transaction(commit=True) as curs:  # a clean slate for the tp_ tables
        curs.execute("TRUNCATE tp_personas, tp_conversations, tp_messages, tp_usage, tp_shares")
    return recorder


def test_a_redelivery_inside_one_batch_is_applied_once(stack: Stack, chat_app: Any) -> None:
    recorder = fresh_recorder(stack)
    projection = ChatProjection(recorder)

    user = chat_app.register_user(f"batch-{uuid.uuid4().hex[:10]}@example.com", "correct horse battery")
    start = chat_app.recorder.max_notification_id() or 0
    conversation = chat_app.start_conversation(user)
    posted = chat_app.post_message(conversation, user, "m1", "hello there")
    chat_app.complete_reply(conversation, posted.reply_id, text="hi", **OUTCOME)
    mine = [n for n in chat_app.recorder.select_notifications(start, 1000, inclusive_of_start=False)
            if n.originator_id == conversation]
    deliveries = [Delivery(event_headers(n), n.state) for n in mine]
    assert len(deliveries) >= 3, "started, posted, reply requested, completed"

    positions = read_positions(recorder, 1)
    # the batch as a rewound consumer may hand it over: everything, then the newest again
    positions = apply_batch(projection, chat_app.event_log(), deliveries + deliveries[-2:], positions)
    assert usage(recorder, user) == (5, 1), "the reply counted once"
    assert positions.head == mine[-1].id

    # the whole batch again (a projector restarted before its acks): nothing changes
    positions = apply_batch(projection, chat_app.event_log(), deliveries, positions)
    assert usage(recorder, user) == (5, 1)
    fresh = apply_batch(projection, chat_app.event_log(), deliveries, read_positions(recorder, 1))
    assert usage(recorder, user) == (5, 1), "positions read back from the tracking table skip them too"
    assert fresh.head == mine[-1].id
    rows = recorder.messages(conversation)
    assert [(r["role"], r["status"], r["text"]) for r in rows] == [("user", "complete", "hello there"),
                                                                  ("assistant", "complete", "hi")]


def test_two_projectors_reading_one_partition_by_mistake_apply_each_event_once(stack: Stack, chat_app: Any) -> None:
    """Two projectors that read one partition (two processes; here two recorders with pools
    of their own): one applies a batch the other applied most of already, while its own
    positions, read before, still say nothing was. Under the partition's advisory lock the
    batch reads the positions again and skips what the other applied: its one new event
    moves the position, and no reply is counted twice."""
    first = fresh_recorder(stack)
    second = make_recorder(stack, first.tracking_table_name)
    user = chat_app.register_user(f"twice-{uuid.uuid4().hex[:10]}@example.com", "correct horse battery")
    start = chat_app.recorder.max_notification_id() or 0
    conversations = []
    for i in range(4):
        conversation = chat_app.start_conversation(user)
        posted = chat_app.post_message(conversation, user, f"m{i}", "hello there")
        chat_app.complete_reply(conversation, posted.reply_id, text="hi", **OUTCOME)
        conversations.append(conversation)
    mine = [n for n in chat_app.recorder.select_notifications(start, 1000, inclusive_of_start=False)
            if n.originator_id in conversations]
    deliveries = [Delivery(event_headers(n), n.state) for n in mine]
    stale = read_positions(second, 1)  # the second projector's positions, read at its start

    last_reply = max(i for i, d in enumerate(deliveries) if d.headers[H_TOPIC].endswith("ReplyCompleted"))
    apply_batch(ChatProjection(first), chat_app.event_log(), deliveries[:last_reply], read_positions(first, 1))
    assert usage(first, user) == (5 * 3, 3)
    # the second one's batch: the replies the first completed, then the newest events
    completed = [d for d in deliveries[:last_reply] if d.headers[H_TOPIC].endswith("ReplyCompleted")]
    after = apply_batch(ChatProjection(second), chat_app.event_log(), completed + deliveries[last_reply:], stale)
    assert usage(first, user) == (5 * 4, 4), "each reply counted once"
    assert after.head == mine[-1].id == read_positions(first, 1).head


def test_a_projector_with_nothing_cached_seals_each_message_under_its_owner_in_a_batch(
    stack: Stack, chat_app: Any
) -> None:
    """A projector started afresh knows no conversation's owner: it reads each from the
    conversations table inside the batch, after other statements of the batch are sent
    and before their results are read. Each message is sealed under its own owner's key
    and reads back whole."""
    first = fresh_recorder(stack)
    users = [chat_app.register_user(f"cold-{uuid.uuid4().hex[:10]}@example.com", "correct horse battery")
             for _ in range(2)]
    start = chat_app.recorder.max_notification_id() or 0
    conversations = [chat_app.start_conversation(user) for user in users]
    posted = [chat_app.post_message(c, u, "m1", f"hello from {i}") for i, (c, u) in enumerate(zip(conversations, users))]
    mine = [n for n in chat_app.recorder.select_notifications(start, 1000, inclusive_of_start=False)
            if n.originator_id in conversations]
    started = [n for n in mine if event_headers(n)[H_TOPIC].endswith("Started")]
    apply_batch(ChatProjection(first), chat_app.event_log(), [Delivery(event_headers(n), n.state) for n in started],
                read_positions(first, 1))
    for (c, p) in zip(conversations, posted):
        chat_app.complete_reply(c, p.reply_id, text=f"reply to {c}", **OUTCOME)
    rest = [n for n in chat_app.recorder.select_notifications(start, 1000, inclusive_of_start=False)
            if n.originator_id in conversations and n not in started]
    # in the order stored: the second conversation's owner is looked up after the first's
    # message and reply request were sent in the batch's pipeline
    assert [n.originator_id for n in rest[:3]] == [conversations[0], conversations[0], conversations[1]]
    cold = make_recorder(stack, first.tracking_table_name)
    cold.sealer = type(first.sealer)(chat_app.mapper.keys)  # sealed under each owner's key
    apply_batch(ChatProjection(cold), chat_app.event_log(), [Delivery(event_headers(n), n.state) for n in rest],
                read_positions(cold, 1))
    for i, c in enumerate(conversations):
        rows = cold.messages(c)
        assert [(r["role"], r["text"]) for r in rows] == [("user", f"hello from {i}"), ("assistant", f"reply to {c}")]

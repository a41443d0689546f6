"""Subjects, headers and the JetStream stream that carry the events between processes.

Durable events travel on `chat.ev.<partition>.<Aggregate>.<Event>` in the `CHAT` stream; the
payload is the event exactly as stored in PostgreSQL (compressed, then AES-GCM encrypted),
so conversation text never lies in plaintext on the broker's disk. `Nats-Msg-Id` is the
event id (`<originator id>:<version>`), so the broker drops a republished event.

The partition is `crc32(aggregate id) % CHATBOT_PARTITIONS`: every event of one
conversation is on one partition, in order. A worker or projector may read a subset of
the partitions (`CHATBOT_CONSUME_PARTITIONS`) through its own durable consumer, filtered
on those subjects; docs/scaling.md says how to lay them out.

Tokens are ephemeral: they go out on the core subject `chat.tok.<conversation id>` to
whichever API process holds the conversation's websocket, and never touch a disk.
"""

from __future__ import annotations

import zlib
from typing import Any
from uuid import UUID

import msgspec
from eventsourcing.persistence import Mapper, Notification, StoredEvent
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from chatbot.runtime.config import format_partitions

EVENT_SUBJECT_PREFIX = "chat.ev"
TOKEN_SUBJECT_PREFIX = "chat.tok"
CANCEL_SUBJECT_PREFIX = "chat.cancel"
PROGRESS_SUBJECT_PREFIX = "chat.progress"
DUPLICATE_WINDOW_S = 600.0

H_TOPIC = "Chat-Topic"
H_ORIGINATOR = "Chat-Originator"
H_VERSION = "Chat-Version"
H_NOTIFICATION = "Chat-Notification-Id"


def partition_of(originator_id: UUID | str, partitions: int) -> int:
    """A stable partition for an aggregate: all its events land on one subject, in order."""
    return zlib.crc32(str(originator_id).encode()) % partitions


def event_name(topic: str) -> str:
    """`domain.conversation:Conversation.ReplyRequested` -> `Conversation.ReplyRequested`."""
    return topic.rsplit(":", 1)[-1]


def event_subject(notification: StoredEvent, partitions: int) -> str:
    partition = partition_of(notification.originator_id, partitions)
    return f"{EVENT_SUBJECT_PREFIX}.{partition}.{event_name(notification.topic)}"


def event_filter(event: str = ">") -> str:
    """A consumer filter for one event type across all partitions, e.g.
    `event_filter("Conversation.ReplyRequested")`."""
    return f"{EVENT_SUBJECT_PREFIX}.*.{event}" if event != ">" else f"{EVENT_SUBJECT_PREFIX}.>"


def consumer_filters(event: str, chosen: tuple[int, ...]) -> list[str] | None:
    """The filter subjects of a durable consumer that reads only the `chosen` partitions
    (None: one filter over all of them, `event_filter(event)`)."""
    if not chosen:
        return None
    return [f"{EVENT_SUBJECT_PREFIX}.{p}.{event}" for p in chosen]


def consumer_name(base: str, chosen: tuple[int, ...]) -> str:
    """A durable consumer per set of partitions: `workers` reads them all, `workers-p0-3_6`
    reads 0 to 3 and 6. Processes with the same set share it and split its messages; a
    different set is a different consumer, so changing a process's set never inherits
    another consumer's filter or position."""
    if not chosen:
        return base
    return f"{base}-p{format_partitions(chosen, sep='_')}"


def assign_partitions(partitions: int, groups: int) -> list[tuple[int, ...]]:
    """Deal `partitions` round-robin to `groups` consumers (each gets at least one)."""
    if not 1 <= groups <= partitions:
        raise ValueError(f"{groups} consumer groups need 1 to {partitions} partitions (CHATBOT_PARTITIONS)")
    return [tuple(range(g, partitions, groups)) for g in range(groups)]


def token_subject(conversation_id: UUID | str) -> str:
    return f"{TOKEN_SUBJECT_PREFIX}.{conversation_id}"


def progress_subject(reply_id: UUID | str) -> str:
    """Core request subject: the worker writing the reply answers with its text so far
    (a `TokenDelta` at offset 0); no answer means no worker is writing it now."""
    return f"{PROGRESS_SUBJECT_PREFIX}.{reply_id}"


def cancel_subject(reply_id: UUID | str) -> str:
    """Core subject on which every worker hears that a reply should stop."""
    return f"{CANCEL_SUBJECT_PREFIX}.{reply_id}"


def event_headers(notification: Notification) -> dict[str, str]:
    return {
        "Nats-Msg-Id": f"{notification.originator_id}:{notification.originator_version}",
        H_TOPIC: notification.topic,
        H_ORIGINATOR: str(notification.originator_id),
        H_VERSION: str(notification.originator_version),
        H_NOTIFICATION: str(notification.id),
    }


def decode_event(mapper: Mapper[UUID], headers: dict[str, str], payload: bytes) -> Any:
    """Turn a stream message back into the domain event (decrypting it on the way)."""
    stored = StoredEvent(
        originator_id=UUID(headers[H_ORIGINATOR]),
        originator_version=int(headers[H_VERSION]),
        topic=headers[H_TOPIC],
        state=payload,
    )
    return mapper.to_domain_event(stored)


async def ensure_stream(js: JetStreamContext, name: str, replicas: int = 1) -> None:
    """Create the event stream, or bring its configuration up to date (idempotent). On a
    cluster `replicas` is 3: each event is acked once a majority of the nodes stored it."""
    config = StreamConfig(
        name=name,
        subjects=[f"{EVENT_SUBJECT_PREFIX}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        duplicate_window=DUPLICATE_WINDOW_S,
        num_replicas=replicas,
        max_age=30 * 24 * 3600.0,
        allow_atomic=True,  # the relay's batches land whole or not at all (workers/relay.py)
    )
    try:
        await js.stream_info(name)
    except NotFoundError:
        await js.add_stream(config)
    else:
        await js.update_stream(config)


# -- the token channel between a worker and the API ------------------------------------------


class TokenDelta(msgspec.Struct, tag="token"):
    reply_id: str
    offset: int  # characters of this reply sent before this delta
    text: str


class ReplyDone(msgspec.Struct, tag="reply"):
    reply_id: str
    text: str
    finish_reason: str


class ReplyError(msgspec.Struct, tag="error"):
    reply_id: str
    message: str


class TitleWritten(msgspec.Struct, tag="title"):
    """The model wrote the conversation's title after its first reply (`reply_id`)."""

    reply_id: str
    title: str


TokenMessage = TokenDelta | ReplyDone | ReplyError | TitleWritten


def unseen_text(delta: TokenDelta, seen: int) -> tuple[str, int]:
    """The part of `delta` a client holding `seen` characters of the reply lacks, and the
    new count. A reply regenerated after a worker died repeats offsets already sent."""
    end = delta.offset + len(delta.text)
    if end <= seen:
        return "", seen
    return delta.text[max(0, seen - delta.offset):], end
token_encoder = msgspec.json.Encoder()
token_decoder = msgspec.json.Decoder(TokenMessage)

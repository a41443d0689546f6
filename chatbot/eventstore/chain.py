"""The hash chain (tamper evidence) and the recorder that writes events with it.

Hash chain (tamper evidence). Each stored event carries `chain_prev` (its predecessor's
hash; 32 zero bytes for version 1) and `chain_hash` = HMAC-SHA256(chain key, "event" |
chain_prev | originator id | version | topic | state), over the stored bytes, written in the
same statement as the event. The chain key (`CHATBOT_CHAIN_KEY`) never enters the
database, so rewriting a row, or deleting one and relinking the next, cannot be hidden
without it: `chatbot audit --verify` (chatbot/ops/integrity.py) recomputes every hash. Storing
`chain_prev` makes each row verifiable on its own, so a removed event is named by the gap
and its successor is still checked. Removing an aggregate's newest events leaves no gap
and is not detected by the chain alone.

The recorder also keeps the key directory and refuses events under erased keys (keys.py),
and shares commits between concurrent saves (group_commit.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from eventsourcing.persistence import InterfaceError, OperationalError, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from eventsourcing.utils import Environment, retry
from psycopg.sql import SQL, Composed, Identifier

from chatbot.eventstore.group_commit import MAX_EVENT_BYTES, EventTooLarge, GroupCommit
from chatbot.eventstore.keys import KEY_TABLES, DataErased, key_owner
from chatbot.runtime.postgres import WriteTimeout, flush_pipeline, is_timeout
from chatbot.runtime.tracing import child_span

GENESIS = bytes(32)  # `chain_prev` of every aggregate's first event
CHAIN_KEY = "CHAIN_KEY"  # environment variable of the factory: base64 HMAC key


def seal(key: bytes, kind: bytes, prev: bytes, originator_id: UUID, version: int, topic: str, state: bytes) -> bytes:
    """HMAC-SHA256 over a stored record, unambiguously framed."""
    t = topic.encode()
    message = b"".join([
        kind, b"\x00", prev, originator_id.bytes, version.to_bytes(8, "big"), len(t).to_bytes(4, "big"), t, state,
    ])
    return hmac.new(key, message, hashlib.sha256).digest()


def event_hash(key: bytes, prev: bytes, e: StoredEvent) -> bytes:
    return seal(key, b"event", prev, _uuid(e.originator_id), e.originator_version, e.topic, e.state)


def snapshot_mac(key: bytes, e: StoredEvent) -> bytes:
    return seal(key, b"snapshot", b"", _uuid(e.originator_id), e.originator_version, e.topic, e.state)


def _uuid(value: UUID | str) -> UUID:
    return value if isinstance(value, UUID) else UUID(str(value))


def chain_key_of(env: Environment) -> bytes:
    value = env.get(CHAIN_KEY)
    if not value:
        raise OSError(f"'{CHAIN_KEY}' not in env: the hash chain needs a key (CHATBOT_CHAIN_KEY)")
    key = base64.b64decode(value)
    if len(key) < 16:
        raise ValueError("the chain key has at least 16 bytes")
    return key


@dataclass
class _Insert:
    """What one insert learns before it locks the events table: predecessors' hashes."""

    prev: dict[UUID, bytes] = field(default_factory=dict)


INSERT_ATTEMPTS = 3  # an insert that lost its connection is tried again; a timeout is not


class ChainedApplicationRecorder(PostgresApplicationRecorder):
    """Inserts events with their hash chain; refuses events under erased keys; erases a
    user's key (`insert_events(..., erase_user=id)`) in the transaction of `User.Erased`."""

    def __init__(self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events",
                 chain_key: bytes = b"", snapshots_table_name: str | None = None) -> None:
        super().__init__(datastore, events_table_name=events_table_name)
        if not chain_key:
            raise ValueError("a chained recorder needs the chain key")
        if datastore.enable_db_functions:
            raise ValueError("the hash chain is computed in Python: leave POSTGRES_ENABLE_DB_FUNCTIONS off")
        self.chain_key = chain_key
        self.snapshots_table_name = snapshots_table_name
        table = Identifier(datastore.schema), Identifier(events_table_name)
        self.sql_create_statements.extend(SQL(s) for s in KEY_TABLES)  # type: ignore[arg-type]
        self.sql_create_statements.append(SQL(
            "ALTER TABLE {}.{} ADD COLUMN IF NOT EXISTS chain_prev bytea, ADD COLUMN IF NOT EXISTS chain_hash bytea"
        ).format(*table))
        id_type = SQL(datastore.originator_id_type)  # type: ignore[arg-type]
        self.insert_chained = SQL(
            "INSERT INTO {}.{} (originator_id, originator_version, topic, state, chain_prev, chain_hash)"
            " SELECT * FROM unnest(%s::{id}[], %s::bigint[], %s::text[], %s::bytea[], %s::bytea[], %s::bytea[])"
            " RETURNING notification_id"
        ).format(*table, id=id_type)
        # One round trip: share-lock the live keys of the users whose events are inserted,
        # and read the hashes the new events chain to.
        self.select_keys_and_links = SQL(
            "WITH live AS (SELECT user_id FROM user_keys WHERE user_id = ANY(%s::uuid[])"
            " AND wrapped_key IS NOT NULL ORDER BY user_id FOR SHARE)"
            " SELECT 'key' AS kind, user_id AS id, NULL::bytea AS hash FROM live"
            " UNION ALL SELECT 'link', originator_id, chain_hash FROM {}.{}"
            " WHERE (originator_id, originator_version) IN (SELECT * FROM unnest(%s::{id}[], %s::bigint[]))"
        ).format(*table, id=id_type)
        self.delete_snapshots: Composed | None = None
        if snapshots_table_name:
            self.delete_snapshots = SQL(
                "DELETE FROM {}.{} WHERE originator_id IN (SELECT originator_id FROM key_directory WHERE user_id = %s)"
            ).format(Identifier(datastore.schema), Identifier(snapshots_table_name))
        self.group_commit = GroupCommit(self._insert_alone)
        self.select_newer_statement = SQL(
            "SELECT e.originator_id, e.originator_version, e.topic, e.state"
            " FROM unnest(%s::{id}[], %s::bigint[]) AS w(id, v) JOIN {}.{} e"
            " ON e.originator_id = w.id AND e.originator_version > w.v"
            " ORDER BY e.originator_id, e.originator_version"
        ).format(*table, id=id_type)

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def select_newer(self, versions: dict[Any, int]) -> list[StoredEvent]:
        """The events of several aggregates after the given versions, in one statement."""
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self.select_newer_statement, (list(versions), list(versions.values())), prepare=True)
            return [StoredEvent(originator_id=r["originator_id"], originator_version=r["originator_version"],
                                topic=r["topic"], state=bytes(r["state"])) for r in curs.fetchall()]

    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        for e in stored_events:
            if len(e.state) > MAX_EVENT_BYTES:
                raise EventTooLarge(f"an event of {len(e.state):,} bytes; the most is {MAX_EVENT_BYTES:,}")
        with child_span("event store commit", {"chat.events": len(stored_events)}):
            if stored_events and set(kwargs) <= {"tracking"} and kwargs.get("tracking") is None:
                return self.group_commit.insert(stored_events)  # a plain save: may share a commit
            return self._insert(stored_events, **kwargs)

    def _insert_alone(self, stored_events: Sequence[StoredEvent]) -> Sequence[int] | None:
        return self._insert(stored_events)

    def _insert(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        """The library's insert (one transaction, pipelined), tried again only when the
        connection failed: a statement or lock timeout means the server is overloaded or a
        lock is held, and trying again would only hold the caller (and everyone queued
        behind it) longer. The library's own retry (10 tries) would wait 10 lock timeouts."""
        insert = PostgresApplicationRecorder.insert_events.__wrapped__  # type: ignore[attr-defined]
        for attempt in range(INSERT_ATTEMPTS):
            try:
                return insert(self, stored_events, chain=_Insert(), **kwargs)
            except (InterfaceError, OperationalError) as e:
                if is_timeout(e):
                    raise WriteTimeout(f"the event store did not finish this save in time ({e}); nothing was saved") from e
                if attempt == INSERT_ATTEMPTS - 1:
                    raise
                time.sleep(0.2)
        raise AssertionError("unreachable")

    def _insert_events(self, curs: Any, stored_events: Sequence[StoredEvent], *, chain: _Insert,
                       erase_user: UUID | None = None, **_: Any) -> None:
        # Runs before the events table is locked, in the same transaction; row locks on
        # keys come first here and in an erasure alike, so the two cannot deadlock.
        if erase_user is not None:
            curs.execute(
                "INSERT INTO user_keys (user_id, wrapped_key, erased_at) VALUES (%s, NULL, now())"
                " ON CONFLICT (user_id) DO UPDATE SET wrapped_key = NULL,"
                " erased_at = coalesce(user_keys.erased_at, now())", (erase_user,),
            )
            if self.delete_snapshots is not None:
                curs.execute(self.delete_snapshots, (erase_user,))
        owners = {e.originator_id: o for e in stored_events if (o := key_owner(e.state)) is not None}
        users = sorted(set(owners.values()))
        starts: dict[Any, int] = {}
        for e in stored_events:
            starts.setdefault(e.originator_id, e.originator_version)
        wanted = [(o, v - 1) for o, v in starts.items() if v > 1]
        if users or wanted:
            curs.execute(self.select_keys_and_links, (users, [o for o, _ in wanted], [v for _, v in wanted]))
            rows = curs.fetchall()
            live = {r["id"] for r in rows if r["kind"] == "key"}
            for user in users:
                if user not in live:
                    raise DataErased(user)
            chain.prev = {r["id"]: bytes(r["hash"]) for r in rows if r["kind"] == "link" and r["hash"] is not None}
        first = [(e.originator_id, owners[e.originator_id]) for e in stored_events
                 if e.originator_version == 1 and e.originator_id in owners]
        if first:
            curs.execute(
                "INSERT INTO key_directory (originator_id, user_id) SELECT * FROM unnest(%s::uuid[], %s::uuid[])"
                " ON CONFLICT (originator_id) DO NOTHING", ([o for o, _ in first], [u for _, u in first]),
            )
            flush_pipeline(curs.connection)

    def _insert_stored_events(self, curs: Any, stored_events: Sequence[StoredEvent], *,
                              chain: _Insert | None = None, **_: Any) -> None:
        assert chain is not None, "events are inserted through insert_events"
        self._lock_table(curs)
        self._notify_channel(curs)
        last = dict(chain.prev)
        prevs, hashes = [], []
        for e in stored_events:
            prev = last.get(e.originator_id, GENESIS) if e.originator_version > 1 else GENESIS
            digest = event_hash(self.chain_key, prev, e)
            prevs.append(prev)
            hashes.append(digest)
            last[e.originator_id] = digest
        curs.execute(self.insert_chained, (
            [e.originator_id for e in stored_events], [e.originator_version for e in stored_events],
            [e.topic for e in stored_events], [e.state for e in stored_events], prevs, hashes,
        ))
        flush_pipeline(curs.connection)  # a big insert is otherwise left half-sent (chatbot/runtime/postgres.py)

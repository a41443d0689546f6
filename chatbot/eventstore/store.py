"""The event store's infrastructure: per-user data keys, a keyed hash chain, sealed snapshots.

Per-user keys (crypto-shredding). Every event that belongs to a user (their `User` and
`ApiKey` events, their conversations' events and snapshots) is encrypted under a data key
of that user's own: 32 random bytes, kept in the `user_keys` table wrapped (AES-GCM) by
the master key, the `CHATBOT_CIPHER_KEY`. Such an event is stored as

    MAGIC (6 bytes) | user id (16 bytes) | nonce (12) | tag (16) | ciphertext

so any holder of the bytes (the relay, the projector reading JetStream, the audit tool)
knows whose key opens it without a lookup. Everything else (personas, `User.Erased`) is
encrypted under the master key as before, in eventsourcing's plain AES-GCM layout; events
written before per-user keys existed read as before. Which user an event belongs to is
decided from the event: a user's own events name them by their id; a conversation's
`Started` (and an API key's `Created`) names its owner, and the recorder writes
`key_directory` (aggregate -> user) in the same transaction, from which the mapper finds
the owner of every later event and snapshot of that aggregate.

Erasing a user destroys their wrapped key (the row stays, marked erased, so no new key can
ever be made for them) in the transaction that records `User.Erased`, and deletes their
snapshots. The recorder takes a share lock on the key of every user whose events it
inserts before it locks the events table, and refuses the insert if the key is gone: an
event under a key can never be committed after that key's erasure, so the projector sees
`Erased` after everything of that user. Processes cache keys for `KEY_TTL_S`, so another
process may still read an erased user's events for that long; nothing is written.

Hash chain (tamper evidence). Each stored event carries `chain_prev` (its predecessor's
hash; 32 zero bytes for version 1) and `chain_hash` = HMAC-SHA256(chain key, "event" |
chain_prev | originator id | version | topic | state), over the stored bytes, written in the
same statement as the event. The chain key (`CHATBOT_CHAIN_KEY`) never enters the
database, so rewriting a row, or deleting one and relinking the next, cannot be hidden
without it: `chatbot audit --verify` (chatbot/ops/integrity.py) recomputes every hash. Storing
`chain_prev` makes each row verifiable on its own, so a removed event is named by the gap
and its successor is still checked. Removing an aggregate's newest events leaves no gap
and is not detected by the chain alone.

Sealed snapshots. A snapshot row carries `mac` = HMAC(chain key, "snapshot" | id | version |
topic | state); a row whose MAC fails is ignored (the aggregate is replayed from its events
instead), so a snapshot copied from another conversation or version is never loaded. Only
the newest snapshot of an aggregate is kept.

Group commit. The recorder locks the events table for each insert (so notification ids
are committed in order, with no gaps a reader could pass over) and commits with an fsync,
so inserts are serialized by that lock. Saves that arrive while another is committing
wait and go in together, in one transaction (one lock, one fsync), led by the first of
them; the first of a quiet process's saves goes at once. A batch never holds two saves of
one aggregate. A batch that fails on a conflict (another process saved first) or on an
erased key is undone whole, and each of its saves is then tried alone, so each gets the
outcome it would have had alone.

Bounds (chatbot/runtime/postgres.py). A batch holds at most GROUP_COMMIT_MAX_EVENTS events and
GROUP_COMMIT_MAX_BYTES stored bytes; an event over MAX_EVENT_BYTES is refused (the broker
could never carry it); a save still queued after GROUP_COMMIT_WAIT_S leaves the queue
unsaved with `WriteTimeout`; every statement is flushed whole (psycopg's pipeline mode
would leave a big one half-sent and wait for good) and runs under the session's statement
and lock timeouts, and a timed-out insert is not tried again.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from eventsourcing.cipher import AESCipher
from eventsourcing.domain import Snapshot
from eventsourcing.persistence import (
    Cipher,
    Compressor,
    IntegrityError,
    InterfaceError,
    Mapper,
    MapperDeserialisationError,
    OperationalError,
    StoredEvent,
    Transcoder,
)
from eventsourcing.popo import POPOApplicationRecorder, POPOFactory
from eventsourcing.postgres import (
    PostgresAggregateRecorder,
    PostgresApplicationRecorder,
    PostgresDatastore,
    PostgresFactory,
)
from eventsourcing.utils import Environment, resolve_topic, retry
from psycopg.sql import SQL, Composed, Identifier

from chatbot.runtime.metrics import GROUP_COMMIT_EVENTS, GROUP_COMMIT_SAVES
from chatbot.runtime.postgres import (
    WriteTimeout,
    bound_sessions,
    flush_pipeline,
    is_timeout,
)
from chatbot.runtime.tracing import child_span, stamp
from domain.batching import Batcher, Item
from domain.conversation import Conversation
from domain.transfer import ImportRecord
from domain.user import AccountErased, ApiKey, User

log = logging.getLogger("eventstore")

MAGIC = b"\x00ukey1"  # a legacy (master-key) event starts with a random nonce: 2**-48 to collide
HEADER = len(MAGIC) + 16
GENESIS = bytes(32)  # `chain_prev` of every aggregate's first event
KEY_TTL_S = 5.0  # how long a process trusts a cached data key
CACHE_MAX = 100_000
CHAIN_KEY = "CHAIN_KEY"  # environment variable of the factory: base64 HMAC key

# The aggregates whose events belong to a user, and the field of their first event that
# names that user (None: the aggregate is the user).
PERSONAL: dict[type, str | None] = {User: None, Conversation: "owner_id", ApiKey: "user_id", ImportRecord: "owner_id"}

KEY_TABLES = [
    """CREATE TABLE IF NOT EXISTS user_keys (
        user_id uuid PRIMARY KEY, wrapped_key bytea,
        created_at timestamptz NOT NULL DEFAULT now(), erased_at timestamptz,
        CHECK ((wrapped_key IS NULL) = (erased_at IS NOT NULL)))""",
    "CREATE TABLE IF NOT EXISTS key_directory (originator_id uuid PRIMARY KEY, user_id uuid NOT NULL)",
    "CREATE INDEX IF NOT EXISTS key_directory_user ON key_directory (user_id)",
]


class DataErased(AccountErased):
    """The data key that encrypts this data was destroyed: the user was erased."""

    def __init__(self, user_id: UUID) -> None:
        super().__init__(f"user {user_id} was erased: their data cannot be read or written")
        self.user_id = user_id


@dataclass(frozen=True)
class Unreadable:
    """Stands for an event whose key was destroyed, where a consumer wants an event (a
    projection skips it, recording its position)."""

    originator_id: Any
    originator_version: int = 0


def key_owner(state: bytes) -> UUID | None:
    """The user whose data key encrypts these stored bytes (None: the master key)."""
    if state[: len(MAGIC)] == MAGIC and len(state) >= HEADER:
        return UUID(bytes=state[len(MAGIC):HEADER])
    return None


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


# -- keys ----------------------------------------------------------------------------------


class DataKey:
    """AES-256-GCM under one key: nonce (12) | tag (16) | ciphertext, the layout of
    eventsourcing's `AESCipher` (pycryptodome), computed by OpenSSL (`cryptography`),
    which is some twenty times faster per event."""

    def __init__(self, key: bytes) -> None:
        assert len(key) in (16, 24, 32), f"an AES key has 16, 24 or 32 bytes, not {len(key)}"
        self.key = key
        self.aead = AESGCM(key)

    def encrypt(self, plaintext: bytes, aad: bytes = b"") -> bytes:
        nonce = os.urandom(12)
        sealed = self.aead.encrypt(nonce, plaintext, aad or None)  # ciphertext | tag
        return nonce + sealed[-16:] + sealed[:-16]

    def decrypt(self, data: bytes, aad: bytes = b"") -> bytes:
        if len(data) < 28:
            raise ValueError("damaged ciphertext: too short")
        try:
            return self.aead.decrypt(data[:12], data[28:] + data[12:28], aad or None)
        except InvalidTag:
            raise ValueError("MAC check failed") from None


def _make_room(cache: dict[Any, Any]) -> None:
    """Drop the oldest quarter of a full cache (dicts keep insertion order)."""
    if len(cache) >= CACHE_MAX:
        for key in list(itertools.islice(cache, CACHE_MAX // 4)):
            del cache[key]


class KeyStore:
    """Each user's data key, wrapped by the master key, and the owner of each aggregate.

    Keys are cached for `KEY_TTL_S`; owners (which never change) and erasures (which are
    final) for good. Subclasses say where the rows live."""

    def __init__(self, master_key: bytes, ttl_s: float = KEY_TTL_S) -> None:
        self.master = DataKey(master_key)
        self.ttl_s = ttl_s
        self._keys: dict[UUID, tuple[float, DataKey]] = {}
        self._owners: dict[UUID, UUID] = {}
        self._erased: set[UUID] = set()
        self._lock = threading.Lock()  # the caches are shared by the threads of a process

    def key_for(self, user_id: UUID, *, create: bool = False) -> DataKey:
        """The user's data key; with `create`, made if the user has none yet. Raises
        DataErased for an erased user (and, reading, for a user with no key at all)."""
        if user_id in self._erased:
            raise DataErased(user_id)
        now = time.monotonic()
        cached = self._keys.get(user_id)
        if cached is not None and now - cached[0] < self.ttl_s:
            return cached[1]
        try:
            wrapped = self._load(user_id)
            if wrapped is None and create:
                wrapped = self._create(user_id, self.master.encrypt(os.urandom(32), self._aad(user_id)))
        except DataErased:
            self._erased.add(user_id)
            with self._lock:
                self._keys.pop(user_id, None)
            raise
        if wrapped is None:
            raise DataErased(user_id)  # events under a key that is not there: unreadable
        key = DataKey(self.master.decrypt(wrapped, self._aad(user_id)))
        with self._lock:
            _make_room(self._keys)
            self._keys[user_id] = (now, key)
        return key

    def owner_of(self, originator_id: UUID) -> UUID | None:
        owner = self._owners.get(originator_id)
        if owner is None:
            owner = self._load_owner(originator_id)
            if owner is not None:
                self.remember(originator_id, owner)
        return owner

    def remember(self, originator_id: UUID, user_id: UUID) -> None:
        """Cache an aggregate's owner. A new aggregate's owner is known only from here
        until its first events commit (with its `key_directory` row), so the newest entries
        are the last to go: a full cache drops its oldest quarter, never the lot."""
        with self._lock:
            self._owners.pop(originator_id, None)  # re-inserted: the newest again
            _make_room(self._owners)
            self._owners[originator_id] = user_id

    def forget(self, user_id: UUID) -> None:
        """This process erased the user: stop using the cached key at once."""
        with self._lock:
            self._keys.pop(user_id, None)
        self._erased.add(user_id)

    @staticmethod
    def _aad(user_id: UUID) -> bytes:
        return b"user-key\x00" + user_id.bytes  # a wrapped key only unwraps for its own user

    # -- storage (subclasses) ----------------------------------------------------------------

    def _load(self, user_id: UUID) -> bytes | None:
        """The wrapped key; None when the user has none; DataErased when it was destroyed."""
        raise NotImplementedError

    def _create(self, user_id: UUID, wrapped: bytes) -> bytes:
        """Store `wrapped` unless the user has a key already; return the stored one."""
        raise NotImplementedError

    def _load_owner(self, originator_id: UUID) -> UUID | None:
        raise NotImplementedError

    def erased_users(self, user_ids: Sequence[UUID]) -> set[UUID]:
        """Those of `user_ids` that were erased."""
        raise NotImplementedError

    def aggregates_of(self, user_id: UUID) -> list[UUID]:
        """The aggregates whose events are under the user's key (from the directory)."""
        raise NotImplementedError


class PostgresKeyStore(KeyStore):
    def __init__(self, datastore: PostgresDatastore, master_key: bytes, ttl_s: float = KEY_TTL_S) -> None:
        super().__init__(master_key, ttl_s)
        self.datastore = datastore

    def _fetchall(self, sql: str, params: Sequence[Any]) -> list[Any]:
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(sql, params)
            return curs.fetchall()

    def _load(self, user_id: UUID) -> bytes | None:
        rows = self._fetchall("SELECT wrapped_key FROM user_keys WHERE user_id = %s", (user_id,))
        if not rows:
            return None
        if rows[0]["wrapped_key"] is None:
            raise DataErased(user_id)
        return bytes(rows[0]["wrapped_key"])

    def _create(self, user_id: UUID, wrapped: bytes) -> bytes:
        self._fetchall(
            "INSERT INTO user_keys (user_id, wrapped_key) VALUES (%s, %s) ON CONFLICT (user_id) DO NOTHING"
            " RETURNING user_id", (user_id, wrapped),
        )
        stored = self._load(user_id)
        assert stored is not None, "a key row that was just written is there"
        return stored

    def _load_owner(self, originator_id: UUID) -> UUID | None:
        rows = self._fetchall("SELECT user_id FROM key_directory WHERE originator_id = %s", (originator_id,))
        return rows[0]["user_id"] if rows else None

    def erased_users(self, user_ids: Sequence[UUID]) -> set[UUID]:
        rows = self._fetchall(
            "SELECT user_id FROM user_keys WHERE user_id = ANY(%s) AND wrapped_key IS NULL", (list(user_ids),)
        )
        return {r["user_id"] for r in rows}

    def aggregates_of(self, user_id: UUID) -> list[UUID]:
        rows = self._fetchall(
            "SELECT originator_id FROM key_directory WHERE user_id = %s ORDER BY originator_id", (user_id,)
        )
        return [r["originator_id"] for r in rows]


class MemoryKeyStore(KeyStore):
    """The same, in memory (for the in-memory event store of the unit tests)."""

    def __init__(self, master_key: bytes) -> None:
        super().__init__(master_key, ttl_s=float("inf"))
        self.rows: dict[UUID, bytes | None] = {}
        self.directory: dict[UUID, UUID] = {}
        self.lock = threading.Lock()

    def _load(self, user_id: UUID) -> bytes | None:
        if user_id in self.rows and self.rows[user_id] is None:
            raise DataErased(user_id)
        return self.rows.get(user_id)

    def _create(self, user_id: UUID, wrapped: bytes) -> bytes:
        with self.lock:
            self.rows.setdefault(user_id, wrapped)
        stored = self._load(user_id)
        assert stored is not None
        return stored

    def _load_owner(self, originator_id: UUID) -> UUID | None:
        return self.directory.get(originator_id)

    def erased_users(self, user_ids: Sequence[UUID]) -> set[UUID]:
        return {u for u in user_ids if u in self.rows and self.rows[u] is None}

    def aggregates_of(self, user_id: UUID) -> list[UUID]:
        return sorted((o for o, u in self.directory.items() if u == user_id), key=str)


# -- the cipher and the mapper ---------------------------------------------------------------

_OWNER: ContextVar[UUID | None] = ContextVar("owner", default=None)


class KeyedCipher(Cipher):
    """Encrypts under the key of the user being mapped (else the master cipher); decrypts
    with whichever key the stored bytes name."""

    def __init__(self, master: Cipher, keys: KeyStore) -> None:
        # eventsourcing's AESCipher under the master key writes what the master DataKey
        # writes, and reads what it reads: use the faster one
        same = isinstance(master, AESCipher) and master.key == keys.master.key
        self.master: Cipher | DataKey = keys.master if same else master
        self.keys = keys

    def encrypt(self, plaintext: bytes) -> bytes:
        owner = _OWNER.get()
        if owner is None:
            return self.master.encrypt(plaintext)
        return MAGIC + owner.bytes + self.keys.key_for(owner, create=True).encrypt(plaintext)

    def decrypt(self, ciphertext: bytes) -> bytes:
        owner = key_owner(ciphertext)
        if owner is None:
            return self.master.decrypt(ciphertext)
        return self.keys.key_for(owner).decrypt(ciphertext[HEADER:])


@lru_cache(maxsize=None)
def aggregate_class(event_class: type) -> type | None:
    """The aggregate class an event class is nested in (`Conversation.Started` ->
    `Conversation`), or None."""
    outer = event_class.__qualname__.split(".", 1)[0]
    cls = getattr(sys.modules.get(event_class.__module__), outer, None)
    return cls if isinstance(cls, type) and cls is not event_class else None


class KeyedMapper(Mapper[UUID]):
    """The library's mapper, choosing the key per event (see the module's notes)."""

    def __init__(self, transcoder: Transcoder, compressor: Compressor | None = None,
                 cipher: Cipher | None = None) -> None:
        assert isinstance(cipher, KeyedCipher), "a KeyedMapper encrypts with a KeyedCipher"
        super().__init__(transcoder, compressor, cipher)
        self.keys: KeyStore = cipher.keys

    def owner(self, event: Any) -> UUID | None:
        """Whose key encrypts `event` (None: the master key)."""
        if isinstance(event, Snapshot):
            aggregate = resolve_topic(event.topic)
        else:
            aggregate = aggregate_class(type(event))
        if aggregate not in PERSONAL:
            return None
        if aggregate is User:
            return None if isinstance(event, User.Erased) else event.originator_id
        if event.originator_version == 1 and not isinstance(event, Snapshot):
            owner = getattr(event, PERSONAL[aggregate] or "", None)
            if isinstance(owner, UUID):
                self.keys.remember(event.originator_id, owner)
                return owner
        # None for an aggregate begun before per-user keys: it stays under the master key
        return self.keys.owner_of(event.originator_id)

    def to_stored_event(self, domain_event: Any) -> StoredEvent:
        stamp(domain_event, type(domain_event).__qualname__)  # its trace context, as metadata (chatbot/runtime/tracing.py)
        token = _OWNER.set(self.owner(domain_event))
        try:
            return super().to_stored_event(domain_event)
        finally:
            _OWNER.reset(token)

    def to_domain_event(self, stored_event: StoredEvent) -> Any:
        try:
            return super().to_domain_event(stored_event)
        except MapperDeserialisationError as e:
            if isinstance(e.__cause__, DataErased):
                raise e.__cause__ from None
            raise

    def forget_user(self, user_id: UUID) -> None:
        self.keys.forget(user_id)


# -- PostgreSQL -------------------------------------------------------------------------------


@dataclass
class _Insert:
    """What one insert learns before it locks the events table: predecessors' hashes."""

    prev: dict[UUID, bytes] = field(default_factory=dict)


GROUP_COMMIT_MAX_EVENTS = 1000  # the most events one group commit inserts
GROUP_COMMIT_MAX_BYTES = 4 << 20  # ... and the most stored bytes (a big save goes alone)
GROUP_COMMIT_WAIT_S = 30.0  # the longest a save waits for its turn before it is refused
MAX_EVENT_BYTES = 6 << 20  # one stored event; JetStream takes messages of up to 8 MB
INSERT_ATTEMPTS = 3  # an insert that lost its connection is tried again; a timeout is not


class EventTooLarge(ValueError):
    """A stored event over MAX_EVENT_BYTES: the broker could never carry it."""


class GroupCommit(Batcher[Sequence[StoredEvent], Sequence[int]]):
    """Saves that arrive while another commits go in together, in one transaction
    (domain/batching.py); `commit` inserts events and returns their notification ids."""

    def __init__(self, commit: Callable[[Sequence[StoredEvent]], Sequence[int] | None],
                 max_events: int = GROUP_COMMIT_MAX_EVENTS, max_bytes: int = GROUP_COMMIT_MAX_BYTES,
                 wait_s: float = GROUP_COMMIT_WAIT_S) -> None:
        super().__init__()
        self.commit = commit
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.wait_s = wait_s

    def insert(self, events: Sequence[StoredEvent]) -> Sequence[int] | None:
        return self.submit(events, wait_s=self.wait_s)

    def timed_out(self, waited_s: float) -> BaseException:
        return WriteTimeout(f"the event store did not take this save within {waited_s:.0f} s; nothing was saved")

    def take(self) -> list[Item[Sequence[StoredEvent], Sequence[int]]]:
        """The oldest queued saves, no two of one aggregate, up to `max_events` events and
        `max_bytes` stored bytes (the oldest always: a big save goes alone)."""
        batch: list[Item[Sequence[StoredEvent], Sequence[int]]] = []
        rest: list[Item[Sequence[StoredEvent], Sequence[int]]] = []
        seen: set[Any] = set()
        size = nbytes = 0
        for item in self.queue:
            originators = {e.originator_id for e in item.value}
            item_bytes = sum(len(e.state) for e in item.value)
            if batch and (size + len(item.value) > self.max_events or nbytes + item_bytes > self.max_bytes
                          or not seen.isdisjoint(originators)):
                rest.append(item)
                continue
            batch.append(item)
            seen |= originators
            size += len(item.value)
            nbytes += item_bytes
        self.queue = rest
        return batch

    def run(self, batch: list[Item[Sequence[StoredEvent], Sequence[int]]]) -> None:
        GROUP_COMMIT_SAVES.observe(len(batch))
        GROUP_COMMIT_EVENTS.observe(sum(len(item.value) for item in batch))
        if len(batch) == 1:
            batch[0].answer(self.commit)
            return
        try:
            ids = self.commit([e for item in batch for e in item.value])
        except (IntegrityError, DataErased):
            for item in batch:  # one of them spoilt the transaction: each alone
                item.answer(self.commit)
            return
        assert ids is not None and len(ids) == sum(len(i.value) for i in batch), "an id per event"
        start = 0
        for item in batch:
            item.succeed(list(ids[start:start + len(item.value)]))
            start += len(item.value)


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


class SealedSnapshotRecorder(PostgresAggregateRecorder):
    """Snapshots with a MAC; rows that fail it are ignored; only the newest is kept."""

    def __init__(self, datastore: PostgresDatastore, *, events_table_name: str = "stored_snapshots",
                 mac_key: bytes = b"") -> None:
        super().__init__(datastore, events_table_name=events_table_name)
        if not mac_key:
            raise ValueError("a sealed snapshot recorder needs the chain key")
        self.mac_key = mac_key
        self.table = Identifier(datastore.schema), Identifier(events_table_name)
        self.sql_create_statements.append(
            SQL("ALTER TABLE {}.{} ADD COLUMN IF NOT EXISTS mac bytea").format(*self.table)
        )
        id_type = SQL(datastore.originator_id_type)  # type: ignore[arg-type]
        self.insert_sealed = SQL(
            "INSERT INTO {}.{} (originator_id, originator_version, topic, state, mac)"
            " SELECT * FROM unnest(%s::{id}[], %s::bigint[], %s::text[], %s::bytea[], %s::bytea[])"
            " ON CONFLICT (originator_id, originator_version) DO NOTHING"
        ).format(*self.table, id=id_type)
        self.delete_older = SQL(
            "DELETE FROM {}.{} s USING unnest(%s::{id}[], %s::bigint[]) AS n(originator_id, originator_version)"
            " WHERE s.originator_id = n.originator_id AND s.originator_version < n.originator_version"
        ).format(*self.table, id=id_type)

    def _insert_stored_events(self, curs: Any, stored_events: Sequence[StoredEvent], **_: Any) -> None:
        with curs.connection.transaction():
            users = sorted({o for e in stored_events if (o := key_owner(e.state)) is not None})
            if users:  # a snapshot taken as its user is erased is dropped, not stored
                curs.execute("SELECT user_id FROM user_keys WHERE user_id = ANY(%s) AND wrapped_key IS NOT NULL"
                             " ORDER BY user_id FOR SHARE", (users,))
                live = {r["user_id"] for r in curs.fetchall()}
                stored_events = [e for e in stored_events if key_owner(e.state) in live or key_owner(e.state) is None]
                if not stored_events:
                    return
            newest: dict[Any, int] = {}
            for e in stored_events:
                newest[e.originator_id] = max(newest.get(e.originator_id, 0), e.originator_version)
            curs.execute(self.insert_sealed, (
                [e.originator_id for e in stored_events], [e.originator_version for e in stored_events],
                [e.topic for e in stored_events], [e.state for e in stored_events],
                [snapshot_mac(self.mac_key, e) for e in stored_events],
            ))
            curs.execute(self.delete_older, (list(newest), list(newest.values())))

    def select_events(self, originator_id: UUID | str, *, gt: int | None = None, lte: int | None = None,
                      desc: bool = False, limit: int | None = None) -> Sequence[StoredEvent]:
        statement = SQL("SELECT * FROM {}.{} WHERE originator_id = %s").format(*self.table)
        params: list[Any] = [originator_id]
        if gt is not None:
            statement += SQL(" AND originator_version > %s")
            params.append(gt)
        if lte is not None:
            statement += SQL(" AND originator_version <= %s")
            params.append(lte)
        statement += SQL(" ORDER BY originator_version DESC" if desc else " ORDER BY originator_version ASC")
        if limit is not None:
            statement += SQL(" LIMIT %s")
            params.append(limit)
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(statement, params, prepare=True)
            rows = curs.fetchall()
        sealed = []
        for row in rows:
            e = StoredEvent(originator_id=row["originator_id"], originator_version=row["originator_version"],
                            topic=row["topic"], state=bytes(row["state"]))
            if row["mac"] is None or not hmac.compare_digest(bytes(row["mac"]), snapshot_mac(self.mac_key, e)):
                log.warning("snapshot %s v%s fails its MAC: ignored", e.originator_id, e.originator_version)
                continue
            sealed.append(e)
        return sealed


class ChatStoreFactory(PostgresFactory):
    """`PERSISTENCE_MODULE=chatbot.eventstore.store:ChatStoreFactory`: PostgreSQL, with the keyed
    mapper, the chained event recorder and sealed snapshots. Needs `CIPHER_TOPIC` and
    `CIPHER_KEY` (the master key) and `CHAIN_KEY`."""

    def __init__(self, env: Environment) -> None:
        super().__init__(env)
        self.chain_key = chain_key_of(self.env)
        master = self.cipher()
        if master is None:
            raise OSError("per-user keys are wrapped by the master key: set CIPHER_TOPIC and CIPHER_KEY")
        self.master_cipher = master
        self.keys = PostgresKeyStore(self.datastore, base64.b64decode(self.env.get("CIPHER_KEY") or ""))
        bound_sessions(self.datastore)  # every statement ends within STATEMENT_TIMEOUT_S

    def _prefix(self) -> str:
        return self.env.name.lower() or "stored"

    def mapper(self, transcoder: Transcoder | None = None, mapper_class: Any = None) -> Mapper[Any]:
        return KeyedMapper(transcoder=transcoder or self.transcoder(), compressor=self.compressor(),
                           cipher=KeyedCipher(self.master_cipher, self.keys))

    def application_recorder(self) -> ChainedApplicationRecorder:
        recorder = ChainedApplicationRecorder(
            self.datastore, events_table_name=f"{self._prefix()}_events", chain_key=self.chain_key,
            snapshots_table_name=f"{self._prefix()}_snapshots" if self.is_snapshotting_enabled() else None,
        )
        if self.env_create_table():
            recorder.create_table()
        return recorder

    def aggregate_recorder(self, purpose: str = "events") -> PostgresAggregateRecorder:
        recorder = SealedSnapshotRecorder(
            self.datastore, events_table_name=f"{self._prefix()}_{purpose}", mac_key=self.chain_key,
        )
        if self.env_create_table():
            recorder.create_table()
        return recorder


# -- in memory --------------------------------------------------------------------------------


class MemoryKeyedRecorder(POPOApplicationRecorder):
    def __init__(self, keys: MemoryKeyStore) -> None:
        super().__init__()
        self.keys = keys

    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        with self.keys.lock:
            erase_user = kwargs.pop("erase_user", None)
            if erase_user is not None:
                self.keys.rows[erase_user] = None
            for e in stored_events:
                owner = key_owner(e.state)
                if owner is not None:
                    if self.keys.rows.get(owner) is None:
                        raise DataErased(owner)
                    if e.originator_version == 1:
                        self.keys.directory.setdefault(e.originator_id, owner)
            return super().insert_events(stored_events, **kwargs)


class MemoryStoreFactory(POPOFactory):
    """`PERSISTENCE_MODULE=chatbot.eventstore.store:MemoryStoreFactory`: the in-memory store with
    per-user keys (no hash chain: that lives in the PostgreSQL recorder)."""

    def __init__(self, env: Environment) -> None:
        super().__init__(env)
        master = self.cipher()
        if master is None:
            raise OSError("per-user keys are wrapped by the master key: set CIPHER_TOPIC and CIPHER_KEY")
        self.master_cipher = master
        self.keys = MemoryKeyStore(base64.b64decode(self.env.get("CIPHER_KEY") or ""))

    def mapper(self, transcoder: Transcoder | None = None, mapper_class: Any = None) -> Mapper[Any]:
        return KeyedMapper(transcoder=transcoder or self.transcoder(), compressor=self.compressor(),
                           cipher=KeyedCipher(self.master_cipher, self.keys))

    def application_recorder(self) -> MemoryKeyedRecorder:
        return MemoryKeyedRecorder(self.keys)

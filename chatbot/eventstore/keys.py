"""Per-user data keys and the key stores: who owns which stored bytes, and erasure.

Per-user keys (crypto-shredding). Every event that belongs to a user (their `User` and
`ApiKey` events, their conversations' events and snapshots) is encrypted under a data key
of that user's own: 32 random bytes, kept in the `user_keys` table wrapped (AES-GCM) by
the master key, the `CHATBOT_CIPHER_KEY`. Such an event is stored as

    MAGIC (6 bytes) | user id (16 bytes) | nonce (12) | tag (16) | ciphertext

so any holder of the bytes (the relay, the projector reading JetStream, the audit tool)
knows whose key opens it without a lookup. Everything else (personas, `User.Erased`) is
encrypted under the master key as before, in eventsourcing's plain AES-GCM layout; events
written before per-user keys existed read as before. Which user an event belongs to is
decided from the event, by the mapper (mapper.py).

Erasing a user destroys their wrapped key (the row stays, marked erased, so no new key can
ever be made for them) in the transaction that records `User.Erased`, and deletes their
snapshots. The recorder (chain.py) takes a share lock on the key of every user whose
events it inserts before it locks the events table, and refuses the insert if the key is
gone: an event under a key can never be committed after that key's erasure, so the
projector sees `Erased` after everything of that user. Processes cache keys for
`KEY_TTL_S`, so another process may still read an erased user's events for that long;
nothing is written.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from eventsourcing.postgres import PostgresDatastore

from domain.user import AccountErased

MAGIC = b"\x00ukey1"  # a legacy (master-key) event starts with a random nonce: 2**-48 to collide
HEADER = len(MAGIC) + 16
KEY_TTL_S = 5.0  # how long a process trusts a cached data key
CACHE_MAX = 100_000

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

    @staticmethod
    def share_lock(curs: Any, user_ids: Sequence[UUID]) -> set[UUID]:
        """Share-lock the key rows of `user_ids` until the transaction of `curs` ends (a
        transaction of another datastore on this database: the projector's); returns those
        of them that were erased. An erasure, which nulls the row, waits for that commit."""
        if not user_ids:
            return set()
        curs.execute(
            "SELECT user_id, wrapped_key IS NULL AS erased FROM user_keys WHERE user_id = ANY(%s::uuid[])"
            " ORDER BY user_id FOR SHARE", (list(user_ids),),
        )
        return {row["user_id"] for row in curs.fetchall() if row["erased"]}


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
